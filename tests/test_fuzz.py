"""Fuzzing the checkpoint reader through the CLI: corrupt files never crash, never write a file."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from tests.conftest import run_scrub

TINY = ["--arch", "tests.tiny_models:tiny_cnn"]


def mutations(original: bytes, seed: int = 0) -> list[tuple[str, bytes]]:
    """A bounded, seeded set of truncations, bit flips, header edits, random bytes and pickles."""
    rng = random.Random(seed)
    header_end = 8 + int.from_bytes(original[:8], "little")
    header = json.loads(original[8:header_end])
    cases = [("empty", b""), ("pickle", pickle.dumps({"w": [1.0]})), ("zip", b"PK\x03\x04" + bytes(64))]
    cases += [(f"truncate {n}", original[:n]) for n in rng.sample(range(len(original)), 60)]
    for _ in range(80):
        data = bytearray(original)
        position = rng.randrange(header_end)
        data[position] ^= 1 << rng.randrange(8)
        cases.append((f"flip {position}", bytes(data)))
    for index in range(20):
        cases.append((f"random {index}", rng.randbytes(rng.randrange(1, 4096))))
    for index, edit in enumerate(_header_edits(header, rng)):
        body = json.dumps(edit).encode()
        cases.append((f"header edit {index}", len(body).to_bytes(8, "little") + body + original[header_end:]))
    cases.append(("huge header size", (2**63).to_bytes(8, "little") + original[8:]))
    return cases


def _header_edits(header: dict, rng: random.Random) -> list[dict]:
    names = [name for name in header if name != "__metadata__"]
    edits = []
    for _ in range(30):
        edit = json.loads(json.dumps(header))
        name = rng.choice(names)
        change = rng.randrange(6)
        if change == 0:
            edit[name]["dtype"] = rng.choice(["F8", "X", 3, None])
        elif change == 1:
            edit[name]["shape"] = [rng.randrange(-2, 10**6) for _ in range(rng.randrange(0, 4))]
        elif change == 2:
            edit[name]["data_offsets"] = [rng.randrange(-5, 10**7), rng.randrange(-5, 10**7)]
        elif change == 3:
            del edit[name]
        elif change == 4:
            edit["__metadata__"][rng.choice(list(edit["__metadata__"]))] = rng.choice(["", "-1", "nan", "1e9", "[]"])
        else:
            edit["__metadata__"] = rng.choice([[], "x", {"arch": 5}])
        edits.append(edit)
    return edits


@pytest.mark.parametrize("command", ["inspect", "evaluate", "edit"])
def test_corrupt_checkpoints_give_one_line_errors_and_write_nothing(tmp_path, tiny_model_file, tiny_images, command):
    original = tiny_model_file.read_bytes()
    cases = mutations(original, seed=["inspect", "evaluate", "edit"].index(command))
    extra = {"inspect": [], "evaluate": ["--test-dir", tiny_images],
             "edit": ["--clean-dir", tiny_images, "--trigger", tiny_images / "a" / "0.png"]}[command]
    folder = tmp_path / "fuzz"
    folder.mkdir()
    failures = 0
    for name, data in cases:
        path = folder / "m.safetensors"
        path.write_bytes(data)
        result = run_scrub(command, path, *TINY, *extra, "--quiet")
        assert result.exit_code in (0, 2, 3), (name, result.exit_code, result.stderr)
        assert "Traceback" not in result.stderr, name
        if result.exit_code:
            failures += 1
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("scrub: error: "), (name, result.stderr)
        written = sorted(p.name for p in folder.iterdir())
        assert written == ["m.safetensors"] or (command == "edit" and result.exit_code == 0), (name, written)
        for extra_file in folder.iterdir():
            if extra_file.name != "m.safetensors":
                extra_file.unlink()
    assert failures > 0.8 * len(cases)
