"""Evaluation: task data and answer reading, batched scoring against unbatched references, the
eval/report commands on a fit checkpoint, and the validate/test callback."""

import json
import math

import pytest
import torch

import projq_train.cli as cli
import projq_train.lightning_cli as lightning_cli
from projq_train.artifact import load_quantized_model
from projq_train.config import ModelConfig
from projq_train.eval import harness
from projq_train.eval.callback import TaskEval
from projq_train.eval.run import run_eval, run_report
from projq_train.eval.tables import gap_closed
from projq_train.eval.tasks import (
    ChoiceItem,
    choice_item,
    gold_number,
    load_items,
    read_choice,
    read_number,
    resolve_task,
)
from projq_train.models import load_model_and_tokenizer
from tests.conftest import TINY
from tests.test_fit import TINY_FIT, fit_args

CHOICE_ROWS = [
    {
        "instruction": f"{question}Answer format: {labels}",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }
    for question, labels, answer in [
        ("Is ice cold?\n\n", "true/false", "true"),
        ("Pick: 1) up 2) down\n\n", "answer1/answer2", "answer2"),
        ("Fill: _ ran. Option1: Al Option2: Bo ", "option1/option2", "option1"),
        ("Sky?\n\n", "answer1/answer2/answer3", "answer3"),
    ]
]
MATH_ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(config=TINY["llama"]))


def write_task_files(tmp_path):
    """Task files in the layout ``resolve_task`` expects under ``--data_root``."""
    for name in ("boolq", "ARC-Easy"):
        folder = tmp_path / "llm-adapters" / "dataset" / name
        folder.mkdir(parents=True)
        (folder / "test.json").write_text(json.dumps(CHOICE_ROWS))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("The tower is tall. " * 40)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in MATH_ROWS))
    return tmp_path


@pytest.fixture
def data_root(tmp_path):
    return write_task_files(tmp_path)


# --- reading answers -------------------------------------------------------------------------


def test_read_choice_takes_the_first_label_and_prefers_the_longest_match():
    labels = tuple(f"answer{i}" for i in range(1, 12))
    assert read_choice("The correct answer is Answer2, not answer1", labels) == 1
    assert read_choice("answer10", labels) == 9
    assert read_choice("True.", ("true", "false")) == 0
    assert read_choice("no idea", ("true", "false")) is None


def test_numbers_are_read_as_llm_adapters_and_gsm8k_write_them():
    assert read_number("She pays 3 * $2 = $6. The answer is 1,234.5.") == 1234.5
    assert read_number("-4 degrees") == -4.0
    assert read_number("none") is None
    assert gold_number("so 9 * 2 = 18\n#### 1,018") == 1018.0
    assert gold_number("576.0") == 576.0
    with pytest.raises(ValueError, match="does not end in a number"):
        gold_number("#### eighteen")


def test_choice_item_reads_labels_gold_and_answer_prefix(tiny):
    _, tok = tiny
    item = choice_item(CHOICE_ROWS[2], "alpaca", tok, "f, row 2")
    assert item.labels == ("option1", "option2") and item.gold == 0
    assert item.answer_prefix == "the correct answer is "
    assert item.prompt.endswith("### Response:\n")
    with pytest.raises(ValueError, match=r"f, row 0: the instruction has no 'Answer format"):
        choice_item({"instruction": "Is it?", "answer": "true"}, "alpaca", tok, "f, row 0")
    with pytest.raises(ValueError, match="'maybe' is not one of the choices"):
        choice_item({**CHOICE_ROWS[0], "answer": "maybe"}, "alpaca", tok, "f, row 0")


def test_tasks_resolve_by_name_under_data_root_or_as_name_equals_path(data_root, tmp_path):
    assert resolve_task("arc-easy", data_root).name == "ARC-Easy"
    assert resolve_task("wikitext2", data_root).kind == "perplexity"
    assert resolve_task("gsm8k", data_root).kind == "gsm8k"
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps(CHOICE_ROWS))
    assert resolve_task(f"mine={custom}", data_root).kind == "choice"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve_task("nope", data_root)
    with pytest.raises(FileNotFoundError, match="set --data_root"):
        resolve_task("piqa", data_root)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([CHOICE_ROWS[0], {"instruction": "y? Answer format: true/false"}]))
    with pytest.raises(ValueError, match=r"bad.json, row 1: missing field\(s\) \['answer'\]"):
        load_items(resolve_task(f"boolq={bad}", data_root), "alpaca", None, None)


# --- scoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,seqlen,stride", [(10, 4, 2), (100, 16, 16), (37, 16, 5), (5, 16, 8)])
def test_perplexity_windows_predict_every_token_but_the_first_once(n, seqlen, stride):
    windows = harness.perplexity_windows(n, seqlen, stride)
    scored = [t for b, e, k in windows for t in range(e - k, e)]
    # overlapping windows predict every token but the text's first; side by side ones (stride =
    # seqlen) cannot predict the first token of each window
    skipped = range(0, n, seqlen) if stride == seqlen else [0]
    assert sorted(scored) == [t for t in range(n) if t not in skipped]
    assert all(e - b <= seqlen and (b == 0 or e - k - b >= seqlen - stride) for b, e, k in windows)


def test_sliding_window_perplexity_matches_direct_computation(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (200,))
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    full = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())
    one_window = harness.perplexity(model, ids, seqlen=256, stride=128, batch_size=4)
    assert one_window["tokens"] == 199 and one_window["perplexity"] == pytest.approx(full, rel=1e-4)
    # non-overlapping windows of 64: each window's first token is not predicted
    with torch.no_grad():
        nll = [
            torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:], reduction="sum")
            for w in ids.split(64)
        ]
    expected = math.exp(sum(x.item() for x in nll) / (200 - 4))
    for batch_size in (1, 3):
        got = harness.perplexity(model, ids, seqlen=64, stride=64, batch_size=batch_size)
        assert got["perplexity"] == pytest.approx(expected, rel=1e-4) and got["tokens"] == 196


def naive_choice_scores(model, tok, item: ChoiceItem) -> list[float]:
    """Each label scored alone, unpadded: sum of log p(continuation tokens | context)."""
    ctx = tok(item.prompt + item.answer_prefix.rstrip())["input_ids"]
    out = []
    for label in item.labels:
        cont = tok(" " + label, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def test_batched_choice_scores_equal_scoring_each_label_alone(tiny):
    model, tok = tiny
    items = [choice_item(r, "alpaca", tok, f"row {i}") for i, r in enumerate(CHOICE_ROWS)]
    # byte tokens: " true"/" false" differ in length (one pass per label); " answerN" differ in
    # their last token only (one pass per question)
    paths = [len(harness.choice_requests(it, 0, tok, "alpaca")) for it in items]
    assert paths == [2, 1, 1, 1]
    got = harness.choice_logprobs(model, tok, items, "alpaca", batch_size=3)
    for item, scores in zip(items, got, strict=True):
        assert scores == pytest.approx(naive_choice_scores(model, tok, item), abs=1e-4)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    prompts = ["Hello there", "A much longer prompt than the first one", "Mid length"]
    batched = harness.generate(model, tok, prompts, "alpaca", max_new_tokens=6, batch_size=3)
    alone = [harness.generate(model, tok, [p], "alpaca", max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(batched)


def test_generation_stays_within_the_models_maximum_length(monkeypatch):
    model, tok = load_model_and_tokenizer(
        ModelConfig(config={**TINY["llama"], "max_position_embeddings": 48})
    )
    lengths, real_generate = [], model.generate

    def recording(**kwargs):
        out = real_generate(**kwargs)
        lengths.append((kwargs["input_ids"].shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(model, "generate", recording)
    prompts = ["a long question " * 20, "short"]  # the first alone is longer than 48 tokens
    replies = harness.generate(model, tok, prompts, "alpaca", max_new_tokens=32, batch_size=1)
    assert len(replies) == 2 and lengths[0][0] == 47  # the prompt's end, with room for one token
    assert all(total <= 48 for _, total in lengths) and lengths[1][1] > lengths[1][0]


def test_evaluate_reports_each_kind_of_task(tiny, data_root, monkeypatch):
    model, tok = tiny
    tasks = [resolve_task(t, data_root) for t in ("wikitext2", "boolq", "gsm8k")]
    replies = {
        "boolq (generate)": ["True!", "answer1", "the correct answer is option1", "hmm"],
        "gsm8k (generate)": ["2 + 3 = 5", "It is 1234.0"],
    }
    monkeypatch.setattr(harness, "generate", lambda *a: replies[a[-1]])
    settings = harness.EvalSettings(choice_mode="both", seqlen=64, batch_size=2)
    results = harness.evaluate(model, tok, tasks, settings=settings, progress=False)
    assert results["wikitext2"]["tokens"] > 0 and results["wikitext2"]["perplexity"] > 1
    items = load_items(tasks[1], "alpaca", tok, None)
    scores = harness.choice_logprobs(model, tok, items, "alpaca", 2)
    loglik = sum(
        max(range(len(s)), key=s.__getitem__) == it.gold for s, it in zip(scores, items, strict=True)
    )
    assert results["boolq"] == pytest.approx(
        {"acc_loglik": loglik / 4, "acc_generate": 2 / 4, "unparsed": 1 / 4, "n": 4}
    )
    assert results["gsm8k"] == pytest.approx({"accuracy": 1.0, "unparsed": 0.0, "n": 2})
    limited = harness.evaluate(model, tok, tasks[1:2], settings=harness.EvalSettings(limit=2), progress=False)
    assert limited["boolq"]["n"] == 2 and set(limited["boolq"]) == {"acc_loglik", "n"}


def test_gap_closed_measures_the_way_back_to_the_float_model():
    stages = {
        "float": {"t": {"perplexity": 10.0, "acc": 0.7, "n": 5}},
        "quantized": {"t": {"perplexity": 20.0, "acc": 0.5, "n": 5}},
        "fine-tuned": {"t": {"perplexity": 12.0, "acc": 0.8, "n": 5}},
    }
    closed = gap_closed(stages)
    assert closed["fine-tuned"] == pytest.approx({"t/perplexity": 80.0, "t/acc": 150.0})
    assert closed["quantized"] == {"t/perplexity": 0.0, "t/acc": 0.0}
    assert all(math.copysign(1, v) == 1 for v in closed["quantized"].values())  # 0, not -0, on plots
    assert gap_closed({**stages, "quantized": stages["float"]})["fine-tuned"]["t/acc"] is None
    better = {"t": {"perplexity": 9.0, "acc": 0.8}}  # quantization that happens to help: no gap
    assert gap_closed({**stages, "quantized": better})["fine-tuned"] == {"t/perplexity": None, "t/acc": None}


# --- commands on a fit checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    cli.main(["fit", "--config", str(TINY_FIT), *fit_args(root, 4), "--trainer.val_check_interval=4"])
    return root / "checkpoints" / "last.ckpt"


def test_eval_command_scores_a_checkpoint_an_artifact_or_a_model(checkpoint, data_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    common = ["--tasks", "[wikitext2, boolq]", "--data_root", str(data_root), "--seqlen", "64"]
    cli.main(["eval", "--ckpt_path", str(checkpoint), *common, "--output", str(out)])
    results = json.loads(out.read_text())
    # log-likelihood scoring by default; generation only when asked (--choice_mode generate/both)
    assert set(results) == {"wikitext2", "boolq"} and "acc_loglik" in results["boolq"]
    assert "acc_generate" not in results["boolq"]
    assert "| boolq | acc_loglik |" in capsys.readouterr().out
    artifact = next((checkpoint.parents[1] / "artifacts").iterdir())
    q = run_eval(["wikitext2"], artifact=str(artifact), data_root=str(data_root), seqlen=64)
    qba = run_eval(
        ["wikitext2"], artifact=str(artifact), adapter_init=True, data_root=str(data_root), seqlen=64
    )
    assert q["wikitext2"]["perplexity"] != qba["wikitext2"]["perplexity"]
    with pytest.raises(SystemExit, match="exactly one of --ckpt_path, --artifact or --model"):
        cli.main(["eval", "--tasks", "[boolq]", "--data_root", str(data_root)])


def test_recovery_report_follows_the_checkpoint_through_its_stages(
    checkpoint, data_root, tmp_path, monkeypatch
):
    loads = []

    def counted_load(path):
        loads.append(path)
        return load_quantized_model(path)

    for module in ("projq_train.eval.models", "projq_train.checkpoint"):
        monkeypatch.setattr(f"{module}.load_quantized_model", counted_load)
    report = run_report(
        str(checkpoint), ["wikitext2", "boolq"], str(tmp_path / "rep"), data_root=str(data_root), seqlen=64
    )
    assert list(report["stages"]) == ["float", "quantized", "initialized", "fine-tuned"]
    assert len(loads) == 3  # quantized, initialized, fine-tuned: each packed model built once
    ppl = {s: r["wikitext2"]["perplexity"] for s, r in report["stages"].items()}
    # each stage's share of the gap closed is what its scores give (the arithmetic is tested in
    # test_gap_closed_measures_the_way_back_to_the_float_model); whether the init closes most of
    # it is a property of the quantizer, tested on held-out logits in test_calibrate: here, on a
    # random 2-layer model and one repeated sentence, that share swings from -50 % to +70 % with
    # rounding changes of 1e-7 in the quantizer
    assert report["gap_closed"] == gap_closed(report["stages"])
    assert ppl["quantized"] != ppl["float"] and ppl["initialized"] != ppl["quantized"]
    saved = json.loads((tmp_path / "rep" / "recovery.json").read_text())
    assert saved["gap_closed"] == report["gap_closed"]
    assert (tmp_path / "rep" / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_eval_callback_logs_task_metrics_in_validate(checkpoint, data_root):
    from projq_train.checkpoint import load_trained

    tasks = [resolve_task(t, data_root) for t in ("boolq", "wikitext2")]
    trained = load_trained(checkpoint)
    expected = harness.evaluate(
        trained.model, trained.tokenizer, tasks, settings=harness.EvalSettings(seqlen=64), progress=False
    )
    task_eval = "--trainer.callbacks.init_args."  # options of the callback added last
    args = [
        "validate",
        "--config",
        str(TINY_FIT),
        *fit_args(checkpoint.parents[1], 4),
        "--ckpt_path",
        str(checkpoint),
        "--trainer.callbacks+=projq_train.eval.callback.TaskEval",
        f"{task_eval}tasks=[boolq, wikitext2]",
        f"{task_eval}data_root={data_root}",
        f"{task_eval}seqlen=64",
    ]
    metrics = lightning_cli.trainer_cli(args).trainer.callback_metrics
    assert metrics["val/boolq/acc_loglik"].item() == pytest.approx(expected["boolq"]["acc_loglik"])
    assert metrics["val/wikitext2/perplexity"].item() == pytest.approx(
        expected["wikitext2"]["perplexity"], rel=1e-4
    )


def test_task_eval_refuses_unknown_tasks_when_built_and_missing_data_before_work(data_root, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        TaskEval(["boolqq"], data_root=str(data_root))
    callback = TaskEval(["boolq", "piqa"], data_root=str(tmp_path / "nowhere"), on_validation=False)
    callback.setup(None, None, "fit")  # scores at test only: fit needs no task data
    with pytest.raises(FileNotFoundError, match="set --data_root"):
        callback.setup(None, None, "test")
