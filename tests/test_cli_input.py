"""Bad command-line input: every flag checked the same way on every command, one line and exit status 2,
nothing written; unwritable outputs refused before any work; the shared flags on every command."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusterar import ClusterarError
from clusterar.cli import build_parser, main
from clusterar.clusters import balanced_kmeans, kmeans
from clusterar.experiment import parse_spec
from clusterar.fileio import FILE_MODE, check_writable, save_tensors, write_json
from clusterar.metrics import evaluate_images
from clusterar.tokenizer import VQModel, vq_preset
from clusterar.tokens import encode_dataset
from clusterar.train.tokenizer import TokenizerTrainConfig, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of `clusterar ARGV`, whether argparse or the command refused it."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------- numbers


BAD_NUMBERS = [
    (["encode", "--tokenizer", "T", "--batch-size", "0"], "--batch-size"),
    (["encode", "--tokenizer", "T", "--batch-size", "-4"], "--batch-size"),
    (["tokenizer", "train", "--batch-size", "0"], "--batch-size"),
    (["tokenizer", "train", "--lr", "-1"], "--lr"),
    (["tokenizer", "train", "--steps", "0"], "--steps"),
    (["tokenizer", "train", "--steps", "-5"], "--steps"),
    (["tokenizer", "train", "--on-error", "maybe"], "--on-error"),
    (
        [
            "cluster",
            "fit",
            "--tokenizer",
            "T",
            "--method",
            "kmeans",
            "--clusters",
            "8",
            "--out",
            "c",
            "--restarts",
            "0",
        ],
        "--restarts",
    ),
    (
        ["cluster", "fit", "--tokenizer", "T", "--method", "kmeans", "--clusters", "0", "--out", "c"],
        "--clusters",
    ),
    (
        ["cluster", "fit", "--tokenizer", "T", "--method", "kmeans", "--clusters", "-3", "--out", "c"],
        "--clusters",
    ),
    (["evaluate", "s.npz", "--ref", "digits:val", "--batch-size", "0"], "--batch-size"),
    (["sample", "run", "--out", "o", "--n", "0"], "--n"),
    (["sample", "run", "--out", "o", "--temperature", "0"], "--temperature"),
    (["train", "--tokens", "t", "--tokenizer", "t", "--epochs", "0"], "--epochs"),
    (["train", "--tokens", "t", "--tokenizer", "t", "--epochs", "two"], "--epochs"),
    (["train", "--tokens", "t", "--tokenizer", "t", "--steps", "0"], "--steps"),
    (["train", "--tokens", "t", "--tokenizer", "t", "--steps", "4", "--lr", "nan"], "--lr"),
    (["train", "--tokens", "t", "--tokenizer", "t", "--steps", "4", "--threads", "0"], "--threads"),
    (["sample", "run", "--out", "o", "--seed", "-1"], "--seed"),
    (["experiment", "--data", "folder:d", "--minutes", "0"], "--minutes"),
    (["experiment", "demo", "--epochs", "0"], "--epochs"),
    # a float field without a check of its own: NaN or inf is named as itself, not blamed on --lr later
    (
        ["train", "--tokens", "t", "--tokenizer", "t", "--steps", "4", "--cluster-weight", "nan"],
        "--cluster-weight",
    ),
    (
        ["train", "--tokens", "t", "--tokenizer", "t", "--steps", "4", "--cluster-weight", "inf"],
        "--cluster-weight",
    ),
    (
        ["train", "--tokens", "t", "--tokenizer", "t", "--steps", "4", "--cluster-weight", "-1"],
        "--cluster-weight",
    ),
]


@pytest.mark.parametrize("argv,flag", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_naming_the_flag(capsys, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, argv)
    assert code == 2
    assert_one_line(err, flag, "--help")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_library_checks_come_before_any_file(tmp_path):
    """The same limits hold for library callers, and nothing is written when they fail."""
    for bad in (dict(batch_size=0), dict(steps=0), dict(lr=-1.0), dict(on_error="maybe"), dict(warmup=-1)):
        with pytest.raises(ClusterarError, match="--"):
            train_tokenizer(TokenizerTrainConfig(data="digits", **bad), tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()
    x = torch.randn(32, 4)
    for fn in (kmeans, balanced_kmeans):
        with pytest.raises(ClusterarError, match="at least 1"):
            fn(x, 4, n_init=0)
    with pytest.raises(ClusterarError, match="--batch-size"):
        evaluate_images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "digits:val", batch_size=0)
    tok = VQModel(vq_preset("tiny"))
    for bad in (dict(batch_size=0), dict(batch_size=-4), dict(num_workers=-1)):
        with pytest.raises(ClusterarError, match="--batch-size"):
            encode_dataset(tok, "digits", "val", tmp_path / "tokens" / "val.safetensors", 16, **bad)
    assert not (tmp_path / "tokens").exists()  # no stray val.safetensors.partial.npy


# ----------------------------------------------------------------------------- shared flags


def _commands(parser) -> dict[str, object]:
    """{"tokenizer train": subparser, ...} for every leaf command."""
    out = {}

    def walk(p, prefix):
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or prefix in ("cluster",):
            out[prefix] = p
        for a in subs:
            for name, sp in a.choices.items():
                walk(sp, f"{prefix} {name}".strip())

    walk(parser, "")
    out.pop("", None)
    return out


COMPUTING = {
    "demo",
    "experiment",
    "tokenizer train",
    "tokenizer eval",
    "encode",
    "cluster",
    "cluster fit",
    "cluster inspect",
    "train",
    "evaluate",
    "sample",
}
SHARED = {
    "--device": COMPUTING,
    "--no-progress": COMPUTING,
    "--seed": {"tokenizer train", "cluster", "cluster fit", "cluster inspect", "train", "sample"},
}


def test_shared_flags_are_on_every_command_that_uses_them_with_one_meaning():
    commands = _commands(build_parser())
    for flag, where in SHARED.items():
        helps, defaults = set(), set()
        for name in where:
            (action,) = [a for a in commands[name]._actions if flag in a.option_strings]
            helps.add(action.help.split(" (default: ")[0])  # experiment/demo: the spec's device
            defaults.add(action.default)
        assert len(helps) == 1, (flag, helps)
        assert len(defaults - {None}) <= 1, (flag, defaults)  # None: experiment/demo keep the spec's device
    computing = {c for c in commands if c not in ("info", "pipeline ctf", "cluster export")}
    for name in computing:
        assert any("--threads" in a.option_strings for a in commands[name]._actions), name


def test_help_lists_the_choices_the_library_defines():
    """Choices come from the library's tuples, so help cannot fall behind (a new cluster method, ...)."""
    from clusterar.clusters import CLUSTER_METHODS
    from clusterar.convert import CONVERT_METHODS
    from clusterar.methods import TRAIN_METHODS
    from clusterar.sample import STAGE2_MODES

    commands = _commands(build_parser())

    def action(command: str, flag: str):
        (a,) = [a for a in commands[command]._actions if flag in a.option_strings]
        return a

    assert tuple(action("train", "--method").choices) == TRAIN_METHODS
    assert tuple(action("convert", "--method").choices) == CONVERT_METHODS
    assert tuple(action("sample", "--stage2").choices) == STAGE2_MODES
    for command in ("cluster", "cluster fit"):
        assert tuple(action(command, "--method").choices) == CLUSTER_METHODS
        assert all(m in action(command, "--method").help for m in CLUSTER_METHODS)
    assert all(m in commands["cluster fit"].description for m in CLUSTER_METHODS)


def test_no_progress_is_accepted_where_it_once_was_not(capsys):
    # argparse parses them (and the command then fails on the missing tokenizer file, not on the flag)
    for argv in (
        ["tokenizer", "train", "--no-progress", "--steps", "1"],
        ["encode", "--tokenizer", "nope", "--no-progress"],
    ):
        parser = build_parser()
        args = parser.parse_args(argv)
        assert args.no_progress is True


# ----------------------------------------------------------------------------- outputs


def _mount_tmpfs(where: Path, options: str) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write in: a read-only tmpfs as root (whom permissions do not stop, and CI runs
    as root), a folder without write permission otherwise."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        _mount_tmpfs(ro, "ro,size=64k")
    else:
        ro.chmod(0o555)
    try:
        yield ro
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        ro.chmod(0o755)


OUTPUT_CASES = [
    ["tokenizer", "train", "--data", "digits", "--out", "{ro}/tok"],
    ["tokenizer", "eval", "{tok}", "--out", "{ro}/eval"],
    ["encode", "--tokenizer", "{tok}", "--out", "{ro}/tokens"],
    [
        "cluster",
        "fit",
        "--tokenizer",
        "{tok}",
        "--method",
        "kmeans",
        "--clusters",
        "4",
        "--out",
        "{ro}/c.safetensors",
    ],
    ["cluster", "inspect", "c.safetensors", "--tokenizer", "{tok}", "--out", "{ro}/inspect"],
    ["cluster", "export", "c.safetensors", "--out", "{ro}/mapping.pt"],
    ["cluster", "rearrange", "c.safetensors", "--tokenizer", "{tok}", "--out", "{ro}/t.safetensors"],
    ["train", "--tokens", "t", "--tokenizer", "{tok}", "--steps", "2", "--out", "{ro}/run"],
    ["sample", "{tok}", "--out", "{ro}/samples"],
    ["pipeline", "ctf", "--coarse", "a", "--refiner", "b", "--out", "{ro}/p.json"],
    ["evaluate", "s.npz", "--out", "{ro}/m.json"],
    ["evaluate", "s.npz", "--cache-dir", "{ro}/cache"],
    ["experiment", "quick", "--out", "{ro}/exp"],
    ["demo", "--quick", "--out", "{ro}/demo"],
]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[" ".join(c[:2]) for c in OUTPUT_CASES])
def test_unwritable_outputs_are_refused_before_any_work(capsys, read_only_folder, case):
    ro = read_only_folder
    code, err = run_cli(capsys, [a.format(ro=ro, tok="tokenizer.safetensors") for a in case])
    assert code == 2
    assert_one_line(err, "cannot write in", str(ro))
    assert list(ro.iterdir()) == []


def test_a_file_where_a_folder_must_go(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, err = run_cli(
        capsys, ["tokenizer", "train", "--data", "digits", "--out", str(tmp_path / "f" / "run")]
    )
    assert code == 2
    assert_one_line(err, "is a file, not a folder", "--out")
    with pytest.raises(ClusterarError, match="--cache-dir"):
        check_writable(tmp_path / "f" / "a" / "b", "--cache-dir")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: writes past that fail with ENOSPC, as on a full disk."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=64k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(full_disk):
    target = full_disk / "big.safetensors"
    with pytest.raises(ClusterarError, match="cannot write .*big.safetensors.*No space left"):
        save_tensors(target, {"w": torch.zeros(256, 256)}, {"kind": "test"})
    assert list(full_disk.iterdir()) == []  # neither the final name nor the temporary one


def test_files_get_the_umask_mode(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {})
    write_json(tmp_path / "a.json", {})
    for name in ("a.safetensors", "a.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == FILE_MODE


# ----------------------------------------------------------------------------- specs


SPEC = {
    "data": "digits",
    "tokenizer": {"preset": "tiny"},
    "clusters": {"bal": {"method": "balanced", "n": 16}},
    "train": {"epochs": 1, "model": "tiny"},
    "runs": [{"name": "iar", "method": "iar", "clusters": "bal"}],
}


def _with(path: tuple[str, ...], value):
    import copy

    d = copy.deepcopy(SPEC)
    node = d
    for key in path[:-1]:
        node = node[key] if not isinstance(node, list) else node[int(key)]
    node[path[-1]] = value
    return d


SPEC_CASES = [
    (("train", "epochs"), "two", r"s.toml \[train\]: epochs must be a number, got 'two'"),
    (("train", "lr"), -1, r"s.toml run 'iar' \(model\): lr must be a positive number"),
    (("tokenizer", "steps"), 0, r"s.toml \[tokenizer\]: steps must be at least 1"),
    (("tokenizer", "lr"), "x", r"s.toml \[tokenizer\]: lr must be a number"),
    (("clusters", "bal", "n"), 15, r"s.toml \[clusters.bal\]: n = 15: .*not divisible.* 8 or 16"),
    (("clusters", "bal", "n"), 0, r"s.toml \[clusters.bal\]: n = 0: .*between 1 and"),
    (("clusters", "bal", "n"), 1024, r"s.toml \[clusters.bal\]: n = 1024: .*between 1 and .*K=512"),
    (("eval",), {"samples": "many"}, r"s.toml \[eval\]: samples must be a whole number"),
]


@pytest.mark.parametrize("path,value,message", SPEC_CASES, ids=[".".join(p) for p, _, _ in SPEC_CASES])
def test_spec_values_are_checked_by_table_and_key_before_any_work(path, value, message):
    with pytest.raises(ClusterarError, match=message) as e:
        parse_spec(_with(path, value), "s.toml")
    assert "--" not in str(e.value)  # spec keys, not command-line flags
    parse_spec(SPEC, "s.toml")  # the unchanged spec is valid


def test_the_command_list_and_light_commands_do_not_import_torch():
    """`clusterar --help` answers at once: torch (seconds to import) is loaded only by the commands
    that need it. Checked by what is imported, not by a timing."""
    code = (
        "import sys\n"
        "from clusterar.cli import main\n"
        "for argv in (['--help'], ['info', '--help'], ['pipeline', 'ctf', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "False", res.stdout + res.stderr


# ------------------------------------------------------------------- the table of docs/reliability.md


def reliability_table() -> str:
    """Run the cases above once, in a temporary folder, and return the Markdown rows of what users get
    (`python tests/test_cli_input.py`; docs/reliability.md is made from it)."""
    import io
    import re
    import tempfile

    def run(argv: list[str]) -> str:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit:
                pass
        return err.getvalue().strip().splitlines()[-1]

    def short(argv: list[str]) -> str:
        return "`clusterar " + " ".join(argv) + "`"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            for argv, flag in BAD_NUMBERS:
                value = argv[argv.index(flag) + 1]
                rows.append((f"`{flag} {value}`", short(argv), run(argv)))
            ro = Path(tmp) / "ro"
            ro.mkdir()
            mounted = (
                os.geteuid() == 0
                and subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
                ).returncode
                == 0
            )
            if not mounted:
                ro.chmod(0o555)
            for case in OUTPUT_CASES:
                argv = [a.format(ro="ro", tok="tokenizer.safetensors") for a in case]
                rows.append(("an output in a read-only folder", short(argv), run(argv)))
            if mounted:
                subprocess.run(["umount", str(ro)], check=False)
            Path("f").write_text("x")
            argv = ["tokenizer", "train", "--out", "f/run"]
            rows.append(("a file where the output folder must go", short(argv), run(argv)))
            full = Path(tmp) / "full"
            full.mkdir()
            if (
                os.geteuid() == 0
                and subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True
                ).returncode
                == 0
            ):
                try:
                    save_tensors(full / "model.safetensors", {"w": torch.zeros(256, 256)}, {})
                except ClusterarError as e:
                    rows.append(
                        (
                            "a full disk while writing",
                            "any command (every file is written atomically)",
                            f"error: {e}".replace(tmp + "/", ""),
                        )
                    )
                finally:
                    subprocess.run(["umount", str(full)], check=False)
        finally:
            os.chdir(cwd)
    for path, value, _ in SPEC_CASES:
        try:
            parse_spec(_with(path, value), "s.toml")
        except ClusterarError as e:
            rows.append(
                (
                    f"spec: `{'.'.join(path)} = {value!r}`",
                    "`clusterar experiment s.toml --check`",
                    f"error: {e}",
                )
            )
    lines = ["| input | command | what the user gets |", "|---|---|---|"]
    for a, b, c in rows:
        c = re.sub(r"/tmp/[^ ]*?/(ro|full|f)\b", r"\1", c).replace("|", "\\|")
        lines.append(f"| {a} | {b} | {c} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reliability_table())
