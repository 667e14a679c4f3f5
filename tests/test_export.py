"""``potstill export``: GGUF files read back by transformers' GGUF loader (always) and run in
llama.cpp (when the optional llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
from _tmpfs import can_mount, in_private_mounts
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from potstill import students
from potstill.bundled_models import gguf_parsed_once
from potstill.cli import main
from potstill.errors import ModelLoadError
from potstill.export import export_gguf, llamacpp_logprobs

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
IDS = [[1, 9690, 198, 504, 3458, 282, 4077, 314, 216, 33, 34, 35, 30, 2]]


@pytest.fixture(autouse=True)
def _each_gguf_parsed_once():
    """transformers parses a GGUF's metadata (SmolLM2's 49,152-token vocabulary) anew for the
    config, the weights and the tokenizer; here, as in potstill's own loads, once per file."""
    with gguf_parsed_once():
        yield


def save_student(folder, tokenizer, model) -> str:
    folder.mkdir()
    students.save(model, str(folder))
    tokenizer.save_pretrained(folder)
    return str(folder)


def llama(vocab: int, qat: str | None = None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    if qat:
        students.add_qat(model, qat)
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(torch.tensor(IDS)).logits[0]


@pytest.fixture(scope="module")
def qat_student(tmp_path_factory, smollm2_tokenizer):
    """(folder, model): a 2-layer Llama over SmolLM2's tokenizer trained-on-grid (QAT q4_0)."""
    model = llama(len(smollm2_tokenizer), "q4_0")
    folder = tmp_path_factory.mktemp("export") / "student"
    return save_student(folder, smollm2_tokenizer, model), model


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_export_round_trips_through_transformers_gguf_loader(tmp_path, smollm2_tokenizer, kind):
    model = llama(len(smollm2_tokenizer), None if kind == "f16" else kind)
    folder = save_student(tmp_path / "student", smollm2_tokenizer, model)
    done = export_gguf(folder, tmp_path / "out.gguf", kind)
    expected = {"f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}, "q4_0": {"Q4_0", "Q8_0", "F32"}}
    assert set(done.tensor_types.values()) == expected[kind]
    assert done.tensor_types["token_embd.weight"] == ("F16" if kind == "f16" else "Q8_0")
    assert "output.weight" not in done.tensor_types  # tied: llama.cpp reads token_embd
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    if kind == "f16":
        torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=2e-3)
    else:  # a student trained on the grid is written as exactly those values
        for name, value in AutoModelForCausalLM.from_pretrained(folder).state_dict().items():
            assert torch.equal(back.state_dict()[name], value), name
        torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=1e-5)
    if kind != "q4_0":
        return  # the tokenizer is written the same whatever the type: read it back once
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="out.gguf")
    text = "Hello world 12345, how are you?<|im_end|>"
    assert tok(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert tok.chat_template == smollm2_tokenizer.chat_template


def test_post_training_quantization_rounds_a_plain_student(tmp_path, smollm2_tokenizer):
    """A student not trained on the grid is quantized at export: the file equals the
    fake-quantized PyTorch model."""
    folder = save_student(tmp_path / "student", smollm2_tokenizer, llama(len(smollm2_tokenizer)))
    export_gguf(folder, tmp_path / "q4.gguf", "q4_0")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q4.gguf")
    fake = AutoModelForCausalLM.from_pretrained(folder)
    students.add_qat(fake, "q4_0")
    torch.testing.assert_close(logits(back), logits(fake), rtol=0, atol=1e-5)


def test_qwen2_exports_with_its_biases(tmp_path, smollm2_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
    folder = save_student(tmp_path / "student", smollm2_tokenizer, model)
    done = export_gguf(folder, tmp_path / "q.gguf", "q8_0")
    assert done.architecture == "qwen2" and done.tensor_types["blk.0.attn_q.bias"] == "F32"
    assert done.tensor_types["output.weight"] == "Q8_0"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    students.add_qat(model, "q8_0")
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=1e-5)


def test_an_unknown_architecture_is_refused_by_name(tmp_path, smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    folder = save_student(tmp_path / "gpt2", smollm2_tokenizer, model)
    with pytest.raises(ModelLoadError, match=r"knows the architectures \['llama', 'qwen2'\].*gpt2"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_defaults_to_the_trained_grid_and_warns_on_another(
    tmp_path, qat_student, capsys
):
    folder, _ = qat_student
    assert main(["export", folder, "--gguf", str(tmp_path / "s.gguf")]) == 0
    out = capsys.readouterr().out
    assert "q4_0:" in out and "Q4_0" in out and "Q8_0" in out and "MiB" in out
    with pytest.warns(UserWarning, match="trained on the q4_0 grid"):
        export_gguf(folder, tmp_path / "s8.gguf", "q8_0")
    assert main(["export", str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "n.gguf")]) == 2


@pytest.mark.skipif(
    not HAS_LLAMACPP, reason="llama-cpp-python is not installed (potstill[llamacpp])"
)
def test_llamacpp_runs_the_exported_qat_student_as_trained(tmp_path, qat_student):
    folder, model = qat_student
    export_gguf(folder, tmp_path / "s.gguf")
    ours = torch.log_softmax(logits(model).double(), -1).numpy()
    theirs = llamacpp_logprobs(tmp_path / "s.gguf", IDS[0], n_threads=2)
    # llama.cpp rounds activations to 8 bits for its Q4_0 products: close, not equal
    assert abs(theirs - ours).max() < 0.05
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() == 1.0
    from potstill.export import load_llamacpp

    text = load_llamacpp(tmp_path / "s.gguf", n_threads=2).create_completion(
        "Hello", max_tokens=8, temperature=0.0
    )["choices"][0]["text"]
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_the_qat_recipe_on_the_bundled_pair_exports_what_it_trained(tmp_path, smollm2_dir):
    """`potstill train recipes/qat_q4_0.yaml` (a 2-layer SmolLM2 student, 2 steps), then
    `potstill export`: the file holds the saved student's weights exactly."""
    out = tmp_path / "run"
    args = [
        "train", "recipes/qat_q4_0.yaml", f"student.model={smollm2_dir}", "student.init=prune",
        "student.keep_layers=[0, 29]", "train.max_steps=2", "train.batch_size=2",
        "data.max_length=96", "data.max_train_records=8", "data.max_eval_records=4",
        "train.save_every=0", f"train.output_dir={out}",
    ]  # fmt: skip
    assert main(args) == 0
    assert main(["export", str(out / "model"), "--gguf", str(out / "s.gguf")]) == 0
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert saved.config.potstill_qat == "q4_0"
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="s.gguf")
    for name, value in saved.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    if HAS_LLAMACPP:  # and llama.cpp reads the same distribution
        theirs = llamacpp_logprobs(out / "s.gguf", IDS[0], n_threads=2)
        ours = torch.log_softmax(logits(saved).double(), -1).numpy()
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


@pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` and mount (root)")
def test_an_export_that_fills_the_disk_leaves_no_partial_file(tmp_path, smollm2_tokenizer):
    """A ~6.5 MiB f16 GGUF (SmolLM2's vocabulary) onto a 2 MiB tmpfs: exit 2, one line after the
    write's progress bar, neither the file nor its partial .tmp left."""
    folder = save_student(tmp_path / "student", smollm2_tokenizer, llama(len(smollm2_tokenizer)))
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir(), logs.mkdir()
    export = f"{shlex.quote(sys.executable)} -m potstill.cli export {folder} --gguf {disk}/s.gguf"
    in_private_mounts(
        f"mount -t tmpfs -o size=2m tmpfs {disk}\n"
        f"{export} > {logs}/out 2> {logs}/err; echo $? > {logs}/rc; ls -A {disk} > {logs}/ls\n",
        {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    said = {p.name: p.read_text() for p in logs.iterdir()}
    assert said["rc"].strip() == "2", said["err"][-2000:]
    error = said["err"].strip().splitlines()[-1]  # on a line of its own, after the closed bar
    assert error.startswith("potstill export: error: ") and "ran out while writing s.gguf" in error
    assert said["ls"].split() == []  # neither s.gguf nor s.gguf.tmp
