"""Compare two trees' outputs of the same command: are a refactor's answers, scores and summaries unchanged?

    python scripts/compare_outputs.py OLD_TREE NEW_TREE [--dirs validation/cmp paper_cmp]

Run the same command (e.g. reproduce.sh on a question subset) in a checkout of the old commit and of the new one,
then this script. Byte-identical files are counted by folder; every other file is compared again without what is
not a result (wall times and dates, the tree's own absolute path, a lock file's holder, and the order of keys in a
safetensors header, which the safetensors library writes in no fixed order), and listed. Table 4 and the index hold
timings, so they are listed as differing by nature.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from safetensors import safe_open


def files(root: Path, dirs: list[str]) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for d in dirs for p in (root / d).rglob("*") if p.is_file()}


def folder(name: str, dirs: list[str]) -> str:
    """The first folder of `name` below the compared folder it lies in (answers, maps, ...), or that folder."""
    for d in dirs:
        if name.startswith(d.rstrip("/") + "/"):
            rest = name[len(d.rstrip("/")) + 1 :].split("/")
            return rest[0] if len(rest) > 1 else d
    return "."


def scrub(obj, root: Path):
    """A JSON value without wall times and dates, with the tree's path replaced."""
    if isinstance(obj, dict):
        return {k: scrub(v, root) for k, v in obj.items() if k not in ("seconds", "date", "mtime_ns")}
    if isinstance(obj, list):
        return [scrub(v, root) for v in obj]
    return obj.replace(str(root), "<tree>") if isinstance(obj, str) else obj


def safetensors_content(path: Path):
    with safe_open(path, "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


def verdict(name: str, old: Path, new: Path, old_root: Path, new_root: Path) -> tuple[bool, str]:
    """(equal as a result?, why) for two files whose bytes differ."""
    if "table4_" in name or "index_" in name:
        return False, "timings (differ by nature)"
    if name.endswith(".lock"):  # .slim.lock (a folder) or .<artefact>.lock
        return True, "lock file (its holder)"
    if name.endswith(".safetensors"):
        same = safetensors_content(old) == safetensors_content(new)
        return same, "same tensors and metadata, header key order differs" if same else "tensors or metadata differ"
    if name.endswith(".safetensors.sha256.json"):
        source = Path(name[: -len(".sha256.json")]).name
        same = safetensors_content(old.parent / source) == safetensors_content(new.parent / source)
        return same, "sha256 record of a safetensors file of equal content" if same else "differs"
    if name.endswith(".json"):
        same = scrub(json.loads(old.read_text()), old_root) == scrub(json.loads(new.read_text()), new_root)
        return same, "equal without wall times, dates and the tree's path" if same else "differs"
    if name.endswith(".md"):
        a = re.sub(r"Date: .*", "", old.read_text().replace(str(old_root), "<tree>"))
        b = re.sub(r"Date: .*", "", new.read_text().replace(str(new_root), "<tree>"))
        return a == b, "equal without the date line" if a == b else "differs"
    return False, "differs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--dirs", nargs="+", default=["validation/cmp", "paper_cmp"], help="folders to compare")
    args = parser.parse_args(argv)
    old_root, new_root = args.old.resolve(), args.new.resolve()
    old, new = files(old_root, args.dirs), files(new_root, args.dirs)
    identical, equal, differ = Counter(), Counter(), []
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            differ.append((name, "only in one tree"))
        elif old[name].read_bytes() == new[name].read_bytes():
            identical[folder(name, args.dirs)] += 1
        else:
            same, why = verdict(name, old[name], new[name], old_root, new_root)
            if same:
                equal[why] += 1
            else:
                differ.append((name, why))
    print(f"{sum(identical.values())} files byte-identical, by folder: {dict(identical)}")
    print(f"{sum(equal.values())} files equal once what is not a result is removed: {dict(equal)}")
    print(f"{len(differ)} files differ:")
    for name, why in differ:
        print(f"  {name}: {why}")
    return int(any(why != "timings (differ by nature)" for _, why in differ))


if __name__ == "__main__":
    raise SystemExit(main())
