"""What an accelerator can do: the data-sheet bf16 peaks, matching a device name to them, and a CPU's
measured peak. `clipa plan` turns FLOPs into hours with them; the trainer's MFU divides by them.
"""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per accelerator (per chip for TPUs), from the
# vendors' data sheets. MFU on GPUs uses it; on a CPU MFU is against a measured fp32 matmul peak.
# V100 and T4 have no bf16: their fp16 tensor peak is given. Consumer cards: fp32 accumulation.
PEAK_TFLOPS_BF16 = {
    "A100": 312.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "GH200": 989.0,
    "B200": 2250.0, "B100": 1750.0, "L4": 121.0, "A10": 125.0, "A30": 165.0, "A40": 150.0,
    "L40": 181.0, "L40S": 362.0, "V100": 125.0, "T4": 65.0, "A6000": 155.0, "RTX 6000 Ada": 364.0,
    "4090": 165.0, "3090": 71.0, "MI250X": 383.0, "MI300X": 1307.0,
    "TPU v3": 123.0, "TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6e": 918.0,
}


def _normal(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def match_accelerator(name: str) -> str | None:
    """The table key for a device or accelerator name: exact (ignoring case, spaces, dashes), else
    the longest key contained in the name ("NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA L40S" -> L40S)."""
    wanted = _normal(name)
    if not wanted:
        return None
    for key in PEAK_TFLOPS_BF16:
        if _normal(key) == wanted or _normal(key) == "tpu" + wanted:  # "v4" -> TPU v4
            return key
    contained = [key for key in PEAK_TFLOPS_BF16 if _normal(key) in wanted]
    return max(contained, key=lambda k: len(_normal(k))) if contained else None


def measure_matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    """FLOP/s of the best large fp32 square matmul on the CPU: the peak a CPU's MFU is measured against
    (no data sheet knows a shared or throttled machine's real number)."""
    import time

    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: thread pool, page faults
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


_measured_cpu_peak: float | None = None


def device_peak_flops(device_type: str = "cuda") -> float | None:
    """Peak FLOP/s for MFU: the data-sheet bf16 peak of a known GPU; on a CPU a quick measured fp32
    matmul peak (about a second, once per process); None for an unknown GPU."""
    global _measured_cpu_peak
    import torch

    if device_type == "cpu":
        if _measured_cpu_peak is None:
            _measured_cpu_peak = measure_matmul_peak(sizes=(2048,), repeats=5)
        return _measured_cpu_peak
    if not torch.cuda.is_available():
        return None
    key = match_accelerator(torch.cuda.get_device_name())
    return PEAK_TFLOPS_BF16[key] * 1e12 if key else None
