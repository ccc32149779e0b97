"""What the spawned sharded-run tests (FSDP, FSDP2, HSDP, HSDP2) share: a mixin over a run's
`module` and `optimizer` for parameter names without FSDP's wrapper prefix, local shards,
the flat optimizer state, and a DCP save / load of model and optimizer."""

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed.checkpoint as dcp


class ShardedRunIO:
    module: Any
    optimizer: Any

    def named(self) -> List[Tuple[str, torch.Tensor]]:
        return [(n.replace("_fsdp_wrapped_module.", ""), p) for n, p in self.module.named_parameters()]

    def local_params(self) -> List[torch.Tensor]:
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in self.module.parameters()]

    def flat_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        state = self.optimizer.distributed_state_dict(key_to_param=self.named(), save_param_groups=False)["state"]
        return {n: {k: v.clone() for k, v in flat.items()} for n, flat in state.items()}

    def _state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(self.module),
                "optim": self.optimizer.distributed_state_dict(key_to_param=self.named())}

    def save(self, path: str) -> None:
        dcp.save(self._state(), checkpoint_id=path)

    def load(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner

        state = self._state()
        dcp.load(state, checkpoint_id=path, planner=ShampooLoadPlanner())
        self.optimizer.load_distributed_state_dict(state["optim"], key_to_param=self.named())
        set_model_state_dict(self.module, state["model"])
