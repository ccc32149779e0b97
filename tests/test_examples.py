"""The CIFAR-10 examples in examples/ (STYLE §3), driven by their documentation: every
`python` / `torchrun` command of the "Running the examples" section of README.md is run here, with TEST_FLAGS appended
(synthetic data, a tiny model, 3 steps, CPU with gloo), in one working folder as a reader
would run them. Each run must train (finite losses, evaluated at the end, a checkpoint where
asked) and report the step-1 loss of the single-process run: every mode starts from the same
weights and the same first global batch. The documented DDP command is also run to step 5
with a step-3 checkpoint, and a second launch resumed from that checkpoint must end bitwise
the same. In-process tests cover the CIFAR-10 reader on the real file format, the flag
defaults, the tqdm fallback and plot_metrics.
"""

import csv
import math
import os
import pickle
import re
import shlex
import shutil
import string
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import cifar10_data  # noqa: E402
import metrics  # noqa: E402
import trainer_utils as tu  # noqa: E402
from runtime_setup import Runtime  # noqa: E402

STEPS = 3
# Appended to every documented training command: synthetic data, a width-4 convnet, 16 images
# a step, 3 steps, and an inverse root every 2 steps so that Shampoo preconditions within them.
TEST_FLAGS = [
    "--synthetic",
    "--synthetic-size",
    "256",
    "--batch-size",
    "16",
    "--model-width",
    "4",
    "--eval-batch-size",
    "64",
    "--device",
    "cpu",
    "--no-progress",
    "--max-steps",
    str(STEPS),
    "--precondition-frequency",
    "2",
]


# ------------------------------------------------------------------ the documented commands
def documentation() -> str:
    """The "Running the examples" section of README.md."""
    readme = (ROOT / "README.md").read_text()
    heading = "## Running the examples"
    assert heading in readme, f"README.md has no {heading!r} section"
    start = readme.index(heading)
    end = readme.find("\n## ", start + len(heading))
    return readme[start:] if end == -1 else readme[start:end]


def documented_commands() -> List[List[str]]:
    """argv of each `python ...` / `torchrun ...` line of the section's bash blocks, with the
    blocks' VAR="..." assignments substituted (other commands, such as the download, are not
    run: they need the network)."""
    commands: List[List[str]] = []
    variables: Dict[str, str] = {}
    for block in re.findall(r"```bash\n(.*?)```", documentation(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
            if assignment:
                variables[assignment.group(1)] = shlex.split(assignment.group(2))[0]
            elif line.startswith(("python ", "torchrun ")):
                commands.append(shlex.split(string.Template(line).substitute(variables)))
    return commands


def _option(argv: List[str], name: str) -> Optional[str]:
    """The last value given to --name (argparse semantics), or None."""
    values = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == name]
    return values[-1] if values else None


class Command:
    """One documented training command: its script, process count and arguments."""

    def __init__(self, argv: List[str]):
        script_index = next(i for i, token in enumerate(argv) if token.endswith(".py"))
        self.argv, self.script = argv, Path(argv[script_index]).name
        self.args = argv[script_index + 1 :]
        launcher = argv[1:script_index]
        nproc = _option(launcher, "--nproc_per_node") or next(
            (t.split("=", 1)[1] for t in launcher if t.startswith("--nproc_per_node=")), "1"
        )
        self.nproc = None if argv[0] == "python" else int(nproc)
        self.launcher = [] if self.nproc is None else ["-m", "torch.distributed.run", *launcher]
        self.metrics = _option(self.args, "--metrics-csv")
        self.checkpoint_dir = _option(self.args, "--checkpoint-dir")
        replicate = _option(self.args, "--replicate-degree")
        stem = self.script.replace("_cifar10_example.py", "")
        self.name = f"{stem}-{self.nproc or 'python'}" + (f"-r{replicate}" if replicate else "")

    def run(self, cwd: Path, extra: List[str]) -> List[Dict[str, str]]:
        """Runs it in cwd with TEST_FLAGS and `extra` appended; returns its metrics rows."""
        cwd.mkdir(parents=True, exist_ok=True)
        metrics = ["--metrics-csv", f"{self.name}.csv"] if self.metrics is None else []
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        result = subprocess.run(
            [
                sys.executable,
                *self.launcher,
                str(EXAMPLES / self.script),
                *self.args,
                *TEST_FLAGS,
                *metrics,
                *extra,
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"{' '.join(self.argv)}\nfailed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
        with open(cwd / (self.metrics or f"{self.name}.csv"), newline="") as f:
            return list(csv.DictReader(f))


def _script(argv: List[str]) -> str:
    return next(token for token in argv if token.endswith(".py"))


# The benchmark's command (benchmarks/convergence.py) is test_convergence_benchmark_runs's.
COMMANDS = [
    Command(argv)
    for argv in documented_commands()
    if _script(argv).startswith("examples/") and not _script(argv).endswith("plot_metrics.py")
]
PLOT_COMMANDS = [
    argv for argv in documented_commands() if _script(argv).endswith("plot_metrics.py")
]
RESUMED = next(c for c in COMMANDS if c.script == "ddp_cifar10_example.py")


def _resume_runs(
    command: Command, workdir: Path, elsewhere: Path
) -> Tuple[List[Dict[str, str]], ...]:
    """The command run to step 5 with checkpoints at steps 3 and 5; then a second launch, in a
    folder holding only the step-3 checkpoint and the metrics CSV (rows to 5), resumes."""
    straight = command.run(workdir, ["--max-steps", "5", "--checkpoint-every", "3"])
    ckpt = Path(command.checkpoint_dir) / "step_00000003"
    shutil.copytree(workdir / ckpt, elsewhere / ckpt)
    shutil.copy(workdir / command.metrics, elsewhere / command.metrics)
    resumed = command.run(elsewhere, ["--max-steps", "5", "--checkpoint-every", "3"])
    return straight, resumed


class Launches:
    """Every documented command, started together, three at a time: a launch is mostly
    process start-up (importing torch, one core per process), so overlapping them on 2 cores
    saves about a third of the wall time. Each test waits for the launches it checks."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor):
        self.workdir, self.elsewhere = root / "work", root / "resumed"
        # Longest first: the DDP pair, then by process count.
        self.futures: Dict[str, Future] = {
            RESUMED.name: pool.submit(_resume_runs, RESUMED, self.workdir, self.elsewhere)
        }
        for command in sorted(COMMANDS, key=lambda c: -(c.nproc or 1)):
            if command is not RESUMED:
                self.futures[command.name] = pool.submit(command.run, self.workdir, [])

    def rows(self, command: Command) -> List[Dict[str, str]]:
        result = self.futures[command.name].result()
        return result[0][:STEPS] if command is RESUMED else result

    def reference_loss(self) -> float:
        single = next(c for c in COMMANDS if c.nproc is None and c.script.startswith("default"))
        return float(self.rows(single)[0]["loss"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Launches]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        launches = Launches(tmp_path_factory.mktemp("examples"), pool)
        yield launches
        for future in launches.futures.values():
            future.cancel()


def test_documentation_covers_every_example() -> None:
    scripts = {c.script for c in COMMANDS}
    assert scripts == {p.name for p in EXAMPLES.glob("*_cifar10_example.py")}
    assert any(c.nproc is None for c in COMMANDS) and any(c.nproc == 1 for c in COMMANDS)
    assert PLOT_COMMANDS, "no plot_metrics.py command documented"
    # Commands share one folder: each must write its own files, or one would resume another.
    outputs = [c.metrics for c in COMMANDS if c.metrics] + [
        c.checkpoint_dir for c in COMMANDS if c.checkpoint_dir
    ]
    assert len(outputs) == len(set(outputs))
    assert RESUMED.checkpoint_dir is not None and RESUMED.metrics is not None


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_documented_command_trains(runs, command) -> None:
    rows = runs.rows(command)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert 2.0 < float(rows[0]["loss"]) < 2.6  # about ln(10) for an untrained 10-class model
    assert float(rows[0]["loss"]) == pytest.approx(runs.reference_loss(), rel=1e-5)
    if command is not RESUMED:
        assert 0.0 <= float(rows[-1]["test_accuracy"]) <= 1.0  # evaluated at the end
        if command.checkpoint_dir is not None:
            assert (
                runs.workdir / command.checkpoint_dir / f"step_{STEPS:08d}" / ".metadata"
            ).is_file()


def _leaves(tree: object, prefix: str = "") -> Dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, object] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}/{key}"))
    return out


def _load_checkpoint(path: Path) -> Dict[str, object]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(path) + ".pt")
    return _leaves(torch.load(str(path) + ".pt", weights_only=False))


def test_documented_ddp_command_resumes_exactly(runs) -> None:
    """Resumed from its step-3 checkpoint, the DDP run ends like the uninterrupted one: same
    metrics, weights and optimizer state (every rank's Shampoo blocks), bitwise."""
    straight, resumed = runs.futures[RESUMED.name].result()
    assert [int(r["step"]) for r in straight] == [1, 2, 3, 4, 5]
    assert resumed[:3] == straight[:3]  # rows up to the checkpoint kept, the later ones redone
    same = ("step", "epoch", "loss", "accuracy", "lr", "test_loss", "test_accuracy")
    assert [[r[k] for k in same] for r in resumed] == [[r[k] for k in same] for r in straight]
    last = Path(RESUMED.checkpoint_dir) / "step_00000005"
    a = _load_checkpoint(runs.elsewhere / last)
    b = _load_checkpoint(runs.workdir / last)
    assert a.keys() == b.keys()
    assert any(k.startswith("/optim/state/") and "factor_matrices" in k for k in a)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def test_documented_plot_command(runs, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import plot_metrics

    for command in COMMANDS:  # the CSVs the plot reads
        runs.futures[command.name].result()
    monkeypatch.chdir(runs.workdir)
    for argv in PLOT_COMMANDS:
        plot_metrics.main(argv[2:])
        output = runs.workdir / _option(argv, "--output")
        assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ in-process tests
def _write_fake_cifar10(root: Path, per_file: int) -> Dict[str, np.ndarray]:
    """The python-version layout: cifar-10-batches-py/{data_batch_1..5,test_batch}, each a
    pickled dict with byte-string keys, b"data" uint8 (N, 3072) and b"labels" (a list)."""
    folder = root / cifar10_data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in cifar10_data.CIFAR10_TRAIN_FILES + cifar10_data.CIFAR10_TEST_FILES:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_file)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = data
        written[name + "/labels"] = np.array(labels)
    return written


def test_cifar10_reader_reads_the_python_format(tmp_path) -> None:
    written = _write_fake_cifar10(tmp_path, per_file=3)
    train = cifar10_data.read_cifar10(tmp_path, train=True)
    test = cifar10_data.read_cifar10(tmp_path, train=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32) and len(test) == 3
    # Row layout: 1024 red values, then green, then blue, each image row-major.
    data = written["data_batch_2"]
    image = train.images[3 + 1]
    for channel, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 31)]:
        assert image[channel, y, x] == data[1, channel * 1024 + y * 32 + x]
    assert train.labels.tolist()[3:6] == written["data_batch_2/labels"].tolist()
    assert test.labels.tolist() == written["test_batch/labels"].tolist()


def test_missing_cifar10_says_how_to_get_it(tmp_path) -> None:
    args = tu.build_parser().parse_args(["--data-path", str(tmp_path / "nowhere")])
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(SystemExit) as info:
        cifar10_data.load_cifar10(args, runtime)
    message = str(info.value)
    assert cifar10_data.CIFAR10_URL in message and "cifar-10-batches-py" in message
    assert "--synthetic" in message and "--download" in message


def test_training_on_real_format_files(tmp_path, monkeypatch) -> None:
    """The whole loop on data from the built-in reader: one epoch of 4 steps, metrics written."""
    monkeypatch.setitem(
        sys.modules, "torchvision", None
    )  # it would reject the fake files' checksums
    _write_fake_cifar10(tmp_path / "data", per_file=16)
    args = tu.build_parser().parse_args(
        [
            "--data-path",
            str(tmp_path / "data"),
            "--batch-size",
            "20",
            "--model-width",
            "2",
            "--no-progress",
            "--metrics-csv",
            str(tmp_path / "m.csv"),
            "--grafting-type",
            "SGD",
        ]
    )
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = tu.ConvNet(args.model_width)
    final = tu.train_model(args, runtime, model, tu.instantiate_optimizer(args, model))
    assert final["step"] == 4 and math.isfinite(final["loss"]) and "test_accuracy" in final
    with open(tmp_path / "m.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]


def test_flag_defaults_are_the_optimizer_defaults() -> None:
    from distributed_shampoo.distributed_shampoo import DistributedShampoo

    model = nn.Linear(3, 2)
    ours = tu.instantiate_optimizer(tu.build_parser().parse_args([]), model)
    theirs = DistributedShampoo(model.parameters())
    assert type(ours) is DistributedShampoo
    strip = lambda group: {k: v for k, v in group.items() if k != "params"}  # noqa: E731
    assert strip(ours.param_groups[0]) == strip(theirs.param_groups[0])


def test_grafting_and_list_flags() -> None:
    parse = tu.build_parser().parse_args
    assert tu.instantiate_grafting_config(tu.GraftingType.SGD, None, None) == tu.SGDGraftingConfig()
    args = parse(
        ["--grafting-type", "rmsprop", "--grafting-beta2", "0.9", "--inv-root-override", "0,2"]
    )
    assert tu.instantiate_grafting_config(
        args.grafting_type, args.grafting_beta2, args.grafting_epsilon
    ) == tu.RMSpropGraftingConfig(beta2=0.9)
    assert args.inv_root_override == [0, 2]
    args = parse(["--optimizer-type", "ADAM", "--no-use-decoupled-weight-decay"])
    adam = tu.instantiate_optimizer(args, nn.Linear(3, 2))
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(SystemExit):
        parse(["--grafting-type", "LION"])


def test_progress_falls_back_to_prints_without_tqdm(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    progress = metrics.Progress(total=4, initial=0, enabled=True, use_tqdm=True, log_every=2)
    for step in range(1, 5):
        progress.update(step, loss=1.5, samples_per_s=100.0)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 2/4  loss 1.5000  100 samples/s", "step 4/4  loss 1.5000  100 samples/s"]


def test_plot_metrics_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import plot_metrics

    paths = []
    for name, scale in (("shampoo", 1.0), ("adam", 1.2)):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=metrics.MetricsLogger.FIELDS)
            writer.writeheader()
            for step in range(1, 21):
                writer.writerow({"step": step, "epoch": 0, "loss": scale * 2.3 / step**0.5})
        paths.append(str(path))
    output = tmp_path / "plots" / "loss.png"
    plot_metrics.main(
        [*paths, "--output", str(output), "--labels", "Shampoo", "AdamW", "--smooth", "3"]
    )
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 5000
    assert plot_metrics.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_convergence_benchmark_runs(tmp_path, capsys) -> None:
    """The documented benchmark (benchmarks/convergence.py), a few steps only."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convergence

    output = tmp_path / "convergence.png"
    threads = torch.get_num_threads()
    try:
        convergence.main(
            [
                "--steps",
                "2",
                "--eval-every",
                "2",
                "--sweep-steps",
                "1",
                "--seeds",
                "2",
                "--output",
                str(output),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert all(name in table for name in convergence.OPTIMIZERS)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
