"""Per-step scalars rounded to float32 exactly as the reference materialises them (SPEC B §4.12)."""

import numpy as np


def fl32(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float."""
    return float(np.float32(value))


def float32_bias_correction(beta: float, step: int) -> float:
    """fl32(1 - fl32(fl32(beta)^step)): bc2 (SPEC B §4.4) and the Adam grafting bcg (§4.5)."""
    return float(np.float32(1.0) - np.float32(np.float32(beta) ** np.float32(step)))


def first_moment_bias_correction(beta1: float, beta3: float, step: int) -> float:
    """bc1 = fl32(1 - fl32(fl32(beta3) * fl32(fl32(beta1)^(step-1)))), SPEC B §4.7."""
    power = np.float32(np.float32(beta1) ** np.float32(step - 1))
    return float(np.float32(1.0) - np.float32(np.float32(beta3) * power))
