"""InstructionData: rows -> checked, templated, masked, truncated, padded or packed batches."""

import inspect
import json
import logging

import pytest
import torch

from projq_train.data import instruct
from projq_train.data.calibration import load_rows
from projq_train.data.instruct import (
    IGNORE_INDEX,
    InstructionData,
    ResumableSampler,
    check_rows,
    collate,
    pack,
)
from projq_train.data.prompts import alpaca_prompt
from projq_train.models import byte_tokenizer
from tests.conftest import SHARED_DATA

BOOLQ = SHARED_DATA / "datasets" / "llm-adapters" / "dataset" / "boolq" / "train.json"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write(tmp_path, rows, name="data.json") -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def tasks(n: int) -> list[dict]:
    return [{"instruction": f"task {i}", "output": f"done {i}"} for i in range(n)]


def fitted(path: str, tokenizer=None, **kw) -> InstructionData:
    data = InstructionData(path, tokenizer=tokenizer or byte_tokenizer(), **{"val_fraction": 0.0, **kw})
    data.setup("fit")
    return data


def decode(ids: list[int]) -> str:
    return byte_tokenizer().decode(ids)


def supervised(example) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def test_alpaca_rows_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Hi", "output": "Hey"},
    ]
    data = fitted(write(tmp_path, rows, "data.jsonl"))
    texts = sorted(decode(e["input_ids"]) for e in data.train_data)
    want = sorted(alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] + "</s>" for r in rows)
    assert texts == want
    assert "### Input:\n2 and 3" in want[0] + want[1] and "### Input" not in alpaca_prompt("Hi")


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_labels_mask_exactly_the_prompt(tmp_path, mask_prompt):
    row = {"instruction": "Name a color.", "output": "blue"}
    (ex,) = fitted(write(tmp_path, [row]), mask_prompt=mask_prompt).train_data
    n_prompt = len(alpaca_prompt(row["instruction"]).encode())  # one token per byte
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + len("blue") + 1
    assert ex["input_ids"][-1] == byte_tokenizer().eos_token_id
    if mask_prompt:
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert decode(supervised(ex)) == "blue</s>"
    else:
        assert ex["labels"] == ex["input_ids"]


def test_truncation_keeps_the_prompt_and_part_of_the_response(tmp_path):
    row = {"instruction": "Count.", "output": "one two three"}
    n_prompt = len(alpaca_prompt(row["instruction"]).encode())
    (ex,) = fitted(write(tmp_path, [row]), max_seq_length=n_prompt + 3).train_data
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 3
    assert decode(supervised(ex)) == "one"  # no EOS: it was cut off


def test_examples_without_response_tokens_are_dropped(tmp_path, caplog):
    rows = [{"instruction": "x" * 300, "output": "long"}, {"instruction": "y", "output": "short"}]
    with caplog.at_level(logging.WARNING, logger=instruct.__name__):
        data = fitted(write(tmp_path, rows), max_seq_length=200)
    assert [decode(supervised(e)) for e in data.train_data] == ["short</s>"]
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 1 of 2 train examples with no response token left within max_seq_length 200"
    ]
    with pytest.raises(ValueError, match="max_seq_length 50 is too small"):
        fitted(write(tmp_path, rows), max_seq_length=50)


def test_collate_pads_right_and_masks_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate(examples, pad_id=0)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        k: (torch.long, (2, 3)) for k in ("input_ids", "attention_mask", "labels")
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]


def test_train_loader_batches_are_padded_and_seeded(tmp_path):
    path = write(tmp_path, [{"instruction": "i" * (i + 1), "output": "o"} for i in range(6)])
    data = fitted(path, batch_size=4, pad_to_multiple_of=1)
    batches = list(data.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == byte_tokenizer().pad_token_id).all()
    again = [
        b["input_ids"].tolist() for b in fitted(path, batch_size=4, pad_to_multiple_of=1).train_dataloader()
    ]
    assert again == [b["input_ids"].tolist() for b in batches]


def test_collate_pads_to_a_multiple_capped_at_the_max_length():
    def length(lengths, **kw) -> int:
        examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
        return collate(examples, pad_id=0, **kw)["input_ids"].shape[1]

    assert length([5, 3]) == 5  # the default pads to the longest example only
    assert length([5, 3], pad_to_multiple_of=4) == length([5, 3], pad_to_multiple_of=4, max_length=8) == 8
    assert length([3, 2], pad_to_multiple_of=4, max_length=6) == 4
    assert length([5, 3], pad_to_multiple_of=4, max_length=6) == 6  # 8 would exceed max_length
    assert length([6], pad_to_multiple_of=4, max_length=6) == 6


@pytest.mark.parametrize("multiple, max_seq_length", [(64, 512), (64, 240), (7, 512)])
def test_batches_are_padded_to_a_multiple_without_changing_what_the_loss_sees(
    tmp_path, multiple, max_seq_length
):
    rows = [{"instruction": "i" * (12 * i + 1), "output": "o" * 3 * i} for i in range(10)]  # 142..277 tokens
    path = write(tmp_path, rows)
    kw = {"batch_size": 3, "val_fraction": 0.2, "max_seq_length": max_seq_length}
    plain, padded = fitted(path, pad_to_multiple_of=1, **kw), fitted(path, pad_to_multiple_of=multiple, **kw)
    pairs = [*zip(plain.train_dataloader(), padded.train_dataloader(), strict=True)]
    pairs += [*zip(plain.val_dataloader(), padded.val_dataloader(), strict=True)]
    lengths = []
    for p, q in pairs:
        T, padded_T = p["input_ids"].shape[1], q["input_ids"].shape[1]
        lengths.append(padded_T)
        assert padded_T % multiple == 0 or padded_T == max_seq_length, (T, padded_T)
        assert T <= padded_T < T + multiple and padded_T <= max_seq_length
        for key in p:  # the padding is appended: labels -100, attention mask 0, the pad token
            assert torch.equal(q[key][:, :T], p[key])
        assert (q["labels"][:, T:] == IGNORE_INDEX).all() and (q["attention_mask"][:, T:] == 0).all()
        assert (q["input_ids"][:, T:] == byte_tokenizer().pad_token_id).all()
    if max_seq_length == 240:  # 277 tokens are cut to 240, not padded to 256
        assert 240 in lengths


def test_packed_batches_keep_max_seq_length_when_it_is_not_a_multiple(tmp_path):
    packed = fitted(write(tmp_path, tasks(20)), max_seq_length=200, packing=True, pad_to_multiple_of=64)
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (4, 200) and batch["attention_mask"].all()
    with pytest.raises(ValueError, match="pad_to_multiple_of must be at least 1 .* got 0"):
        InstructionData("x.json", pad_to_multiple_of=0)


def test_missing_field_names_file_and_row_before_tokenizing(tmp_path, monkeypatch):
    monkeypatch.setattr(instruct, "tokenize_row", lambda *a: pytest.fail("tokenized before checking"))
    rows = tasks(3)
    del rows[1]["output"]
    with pytest.raises(
        ValueError, match=r"data\.json, row 1: missing field\(s\) \['output'\] needed by the 'alpaca'"
    ):
        fitted(write(tmp_path, rows))
    bad_test = write(tmp_path, [{"instruction": "a", "output": "b"}, ["not", "a", "dict"]], "test.jsonl")
    with pytest.raises(ValueError, match=r"test\.jsonl, row 1: expected an object with fields, got list"):
        fitted(write(tmp_path, tasks(3)), test_path=bad_test)


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "", "output": "b", "answer": "c"}, "commonsense"),
        ({"question": "a", "answer": "b"}, "gsm8k"),
    ],
)
def test_auto_format_detection(row, fmt):
    assert check_rows([row, row], "auto", "f.json") == fmt


def test_auto_format_error_lists_the_keys_found(tmp_path):
    with pytest.raises(ValueError, match=r"f\.json: cannot tell the format .* fields \['label', 'text'\]"):
        check_rows([{"text": "a", "label": 1}], "auto", "f.json")
    with pytest.raises(
        ValueError, match=r"row 0: missing field\(s\) \['answer'\] needed by the 'commonsense'"
    ):
        check_rows([{"instruction": "a", "output": "b"}], "commonsense", "f.json")


def test_commonsense_target_is_output_and_gsm8k_uses_the_question(tmp_path):
    cs = {
        "instruction": "True or false?",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    }
    (ex,) = fitted(write(tmp_path, [cs])).train_data
    assert decode(supervised(ex)) == "the correct answer is true</s>"
    gsm = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
    (ex,) = fitted(write(tmp_path, [gsm], "gsm.jsonl")).train_data
    assert decode(ex["input_ids"]) == alpaca_prompt("What is 2+2?") + "2+2=4\n#### 4</s>"
    assert decode(supervised(ex)) == "2+2=4\n#### 4</s>"


def test_chat_template(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    (ex,) = fitted(write(tmp_path, rows), tokenizer=tok, template="chat").train_data
    assert decode(ex["input_ids"]) == "<s><|user|>Add.\n\n2 and 3\n<|assistant|>5</s>"
    assert ex["input_ids"].count(tok.bos_token_id) == 1
    assert decode(supervised(ex)) == "5</s>"
    with pytest.raises(ValueError, match="no chat_template; use `template: alpaca`"):
        fitted(write(tmp_path, rows), template="chat")


def instructions(examples) -> set[str]:
    return {decode(e["input_ids"]).split("### Instruction:\n")[1].split("\n")[0] for e in examples}


def test_val_split_sizes_and_seed(tmp_path):
    path = write(tmp_path, tasks(20))
    a, b, c = (fitted(path, val_fraction=0.25, seed=s) for s in (0, 0, 1))
    assert (len(a.train_data), len(a.val_data)) == (15, 5)
    assert instructions(a.train_data).isdisjoint(instructions(a.val_data))
    assert instructions(a.val_data) == instructions(b.val_data) != instructions(c.val_data)
    assert len(fitted(path, val_fraction=0.001).val_data) == 1
    assert fitted(path).val_dataloader() == []
    val = fitted(path, val_path=write(tmp_path, tasks(3), "val.jsonl"), val_fraction=0.5)
    assert (len(val.train_data), len(val.val_data)) == (20, 3)
    val_texts = [decode(row) for batch in val.val_dataloader() for row in batch["input_ids"].tolist()]
    assert [t.split("task ")[1][0] for t in val_texts] == ["0", "1", "2"]  # in file order


def test_limit_applies_to_the_training_rows_only(tmp_path):
    path = write(tmp_path, tasks(20))
    full, limited = fitted(path, val_fraction=0.25), fitted(path, val_fraction=0.25, limit=4)
    assert (len(limited.train_data), len(limited.val_data)) == (4, 5)
    assert instructions(limited.train_data) < instructions(full.train_data)


def test_pack_cuts_exact_chunks_and_keeps_labels_aligned():
    examples = [{"input_ids": ids, "labels": [-t for t in ids]} for ids in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]
    chunks = pack(examples, max_seq_length=4, seed=0)
    assert [len(c["input_ids"]) for c in chunks] == [len(c["labels"]) for c in chunks] == [4, 4]
    for c in chunks:
        assert c["labels"] == [-t for t in c["input_ids"]]
    assert len({t for c in chunks for t in c["input_ids"]}) == 8  # 9 tokens, the tail of 1 dropped


def test_packing_in_the_data_module(tmp_path):
    path = write(tmp_path, tasks(20))
    plain = fitted(path, val_fraction=0.1, max_seq_length=256)
    packed = fitted(path, val_fraction=0.1, max_seq_length=256, packing=True)
    total = sum(len(e["input_ids"]) for e in plain.train_data)
    assert len(packed.train_data) == total // 256 > 4
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (4, 256) and batch["attention_mask"].all()
    assert packed.val_data == plain.val_data  # validation is never packed


def test_test_stage_and_setup_errors(tmp_path):
    path = write(tmp_path, tasks(4))
    data = InstructionData(
        path, test_path=write(tmp_path, tasks(3), "test.jsonl"), tokenizer=byte_tokenizer()
    )
    data.setup("test")
    assert data.train_data is None and sum(b["input_ids"].shape[0] for b in data.test_dataloader()) == 3
    with pytest.raises(ValueError, match="set `test_path`"):
        InstructionData(path, tokenizer=byte_tokenizer()).setup("test")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        InstructionData(path).setup("fit")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        InstructionData(path, val_fraction=1.0)


def test_every_init_argument_is_typed_and_documented():
    doc = inspect.getdoc(InstructionData.__init__)
    params = list(inspect.signature(InstructionData.__init__).parameters.values())[1:]
    assert len(params) == 16
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, p.name
        assert f"\n    {p.name}: " in doc, p.name


def test_recipe_typos_fail_at_parse_time():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InstructionData, "data")
    cfg = parser.parse_args(["--data.path=x.json", "--data.format=gsm8k", "--data.limit=20"])
    assert (cfg.data.format, cfg.data.limit, cfg.data.max_seq_length) == ("gsm8k", 20, 512)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.path=x.json", "--data.format=gsm8"])


@pytest.mark.skipif(not BOOLQ.is_file(), reason="LLM-Adapters boolq data not on this machine")
def test_llm_adapters_boolq():
    data = fitted(str(BOOLQ), limit=20, max_seq_length=512, val_fraction=0.001)
    assert len(data.train_data) == 20 and len(data.val_data) == round(
        0.001 * len(json.loads(BOOLQ.read_text()))
    )
    for ex in data.train_data:
        assert decode(supervised(ex)) in ("the correct answer is true</s>", "the correct answer is false</s>")
        assert "Please answer the following question with true or false" in decode(ex["input_ids"])
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 512


def test_the_training_order_resumes_part_way_and_is_one_order_over_any_number_of_processes():
    rows = list(range(20))
    first = list(ResumableSampler(rows, num_replicas=1, rank=0, seed=3))  # epoch 0
    sampler = ResumableSampler(rows, num_replicas=1, rank=0, seed=3)
    sampler.resume_at(epoch=0, samples_done=8)
    assert list(sampler) == first[8:] and list(sampler) == first  # only the resumed epoch starts late
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == rows and second != first
    sampler = ResumableSampler(rows, num_replicas=1, rank=0, seed=3)
    sampler.resume_at(epoch=0, samples_done=8)
    sampler.set_epoch(1)  # resumed from the end of epoch 0: epoch 1 starts at its beginning
    assert list(sampler) == second
    # two processes with batches of 2 see the single process's batches of 4, and resume alike
    shards = [list(ResumableSampler(rows, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    for k in range(5):
        global_batch = shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]
        assert sorted(global_batch) == sorted(first[4 * k : 4 * k + 4])
    resumed = ResumableSampler(rows, num_replicas=2, rank=1, seed=3)
    resumed.resume_at(epoch=0, samples_done=8)
    assert list(resumed) == shards[1][4:]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.json", "", "has no rows"),
        ("none.json", "[]", "has no rows"),
        ("bad.json", "not json{", "is not valid JSON"),
        ("bad.jsonl", '{"instruction": "a"}\n{oops', "is not valid JSONL"),
        ("dict.json", '{"instruction": "a"}', "expected a JSON list of rows, got dict"),
        ("folder.json", None, "is a directory, not a .json file"),
        ("missing.json", "absent", "does not exist"),
    ],
)
def test_a_bad_data_file_is_one_clear_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "absent":
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=f"{path}.*{message}"):
        load_rows(str(path))
