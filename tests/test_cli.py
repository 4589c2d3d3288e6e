"""The hf-delta command line, end to end on the micro zoo."""

from __future__ import annotations

import json

from hf_delta.cli.main import main
from hf_delta.storage import Delta


def test_compress_command_writes_a_loadable_delta(micro_zoo, tmp_path, capsys, torch_one_thread):
    out = tmp_path / "delta"
    code = main(["compress", str(micro_zoo["llama-base"].path), str(micro_zoo["llama-arith"].path), str(out),
                 "--method", "bitdelta", "--options", json.dumps({"distill_steps": 0, "scale": "matrix"})])
    assert code == 0 and "Saved bitdelta delta" in capsys.readouterr().out
    delta = Delta.from_folder(out)
    assert delta.config.method == "bitdelta" and delta.config.scale == "matrix"
    assert all(w.scales.shape[1] == 1 for w in delta.weights.values())


def test_zoo_list_and_bad_size(micro_zoo, capsys):
    assert main(["zoo", "list", "--dir", str(micro_zoo.root.parent)]) == 0
    assert "llama-arith" in capsys.readouterr().out
    assert main(["zoo", "build", "--size", "huge", "--dir", str(micro_zoo.root.parent)]) == 2
    assert "Unknown zoo size 'huge'" in capsys.readouterr().err


def test_eval_command_writes_json_and_markdown(micro_zoo, tmp_path, capsys, torch_one_thread):
    assert main(["eval", "--size", "micro", "--dir", str(micro_zoo.root.parent), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "zoo-eval-micro.json").read_text())["rows"]
    assert {r["fine-tune"] for r in rows} == {e.name for e in micro_zoo.finetunes}
    assert all(r["linear_layers_changed"].split("/")[0] == r["linear_layers_changed"].split("/")[1] for r in rows)
    assert (tmp_path / "zoo-eval-micro.md").read_text().startswith("`hf-delta eval")


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    code = main(["compress", str(tmp_path / "nope"), str(tmp_path / "nope2"), str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_command_has_help_and_help_loads_no_torch():
    """`hf-delta --help` and each command's `--help` (the benchmark commands the README quotes included) start,
    and none of them imports torch: the parser and each command's flags are import-light."""
    import subprocess
    import sys

    commands = [[], ["zoo"], ["zoo", "build"], ["eval"], ["compress"], ["serve"], ["demo"], ["bench"],
                *(["bench", b] for b in ("fidelity", "serve", "ray", "coserve"))]
    code = ("import sys; from hf_delta.cli.main import main\n"
            f"for argv in {commands!r}:\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("False")
    assert done.stdout.count("usage: hf-delta") == len(commands)


def test_compress_auto_records_each_matrix_choice(micro_zoo, tmp_path, capsys, torch_one_thread):
    from hf_delta.evaluation import task_calibration, task_verification
    from hf_delta.utils.loading import load_tokenizer

    entry = micro_zoo["llama-arith"]
    tok, task = load_tokenizer(entry.path), micro_zoo.task("llama-arith")
    files = {"calib.txt": task_calibration(tok, task, n=16), "held.txt": task_verification(tok, task, 8)}
    for name, texts in files.items():
        (tmp_path / name).write_text("\n".join(t.replace("\n", " ") for t in texts))
    out = tmp_path / "delta"
    code = main(["compress", str(micro_zoo["llama-base"].path), str(entry.path), str(out), "--auto",
                 "--budget-bytes", "8000", "--calibration", str(tmp_path / "calib.txt"),
                 "--heldout", str(tmp_path / "held.txt")])
    assert code == 0 and "Saved auto delta" in capsys.readouterr().out
    delta = Delta.from_folder(out)
    assert delta.config.method == "auto" and delta.config.budget_bytes == 8000
    assert delta.config.heldout_samples == 8
    assert all(w.setting in delta.config.candidates for w in delta.weights.values())
    assert main(["compress", str(micro_zoo["llama-base"].path), str(entry.path), str(out), "--auto"]) != 0
    assert "exactly one of target_retention" in capsys.readouterr().err
