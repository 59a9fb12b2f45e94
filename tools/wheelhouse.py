"""Download every wheel a workshop room needs, for the laptops a room brings.

    python tools/wheelhouse.py                      # all of them, into wheelhouse/
    python tools/wheelhouse.py --python 3.12 --platform windows-x64

For each Python version and platform below it takes the pins of
requirements-lock.txt that apply there (their markers decide: pywin32 only on
Windows, say) and downloads their wheels with pip, never a source package, so
that nothing needs compiling in the room. Participants then set up with no
network (docs/room-kit.md):

    python -m pip install --no-index --find-links wheelhouse -r requirements-lock.txt

Windows on ARM cannot be served: pyarrow publishes no wheel for it. Those
laptops run the x64 Python (windows-x64) under emulation.
"""

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from check_setup import locked_pins  # noqa: E402  (the same reading of the lock as the laptop check)

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def linux(machine):
    # manylinux wheels name the oldest glibc they need; a 2019 or newer Linux has glibc 2.28.
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(28, 16, -1)] + [f"manylinux2014_{machine}"]
    return tags, {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": machine}


PLATFORMS = {
    "linux-x86_64": linux("x86_64"),
    "linux-aarch64": linux("aarch64"),
    # pip also accepts wheels for older macOS releases than the one named (and universal2 ones).
    "macos-arm64": (["macosx_12_0_arm64"], {"sys_platform": "darwin", "platform_system": "Darwin",
                                            "os_name": "posix", "platform_machine": "arm64"}),
    "macos-x86_64": (["macosx_12_0_x86_64"], {"sys_platform": "darwin", "platform_system": "Darwin",
                                              "os_name": "posix", "platform_machine": "x86_64"}),
    "windows-x64": (["win_amd64"], {"sys_platform": "win32", "platform_system": "Windows",
                                    "os_name": "nt", "platform_machine": "AMD64"}),
}


def pins_for(python, platform):
    """The lock's pins that apply to one Python version on one platform."""
    environment = {**PLATFORMS[platform][1], "python_version": python, "python_full_version": f"{python}.0",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    return [f"{name}=={version}" for name, version in locked_pins(environment)]


def download(python, platform, folder):
    tags, _ = PLATFORMS[platform]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--implementation", "cp", "--python-version", python, "--dest", str(folder)]
    for tag in tags:
        command += ["--platform", tag]
    subprocess.run(command + pins_for(python, platform), check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / "wheelhouse", help="the folder to fill")
    parser.add_argument("--python", choices=PYTHONS, action="append", help="only this Python (repeatable)")
    parser.add_argument("--platform", choices=PLATFORMS, action="append", help="only this platform (repeatable)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for platform in args.platform or PLATFORMS:
        for python in args.python or PYTHONS:
            print(f"Python {python} on {platform} ...", flush=True)
            download(python, platform, args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 1e9
    print(f"{len(wheels)} wheels, {size:.1f} GB, in {args.dest}")


if __name__ == "__main__":
    main()
