"""Invariant and behaviour tests on tiny CPU models. Run: python -m pytest -q"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import hydra_ppo as hp
from lora import (LoRALinear, add_lora, folded, load_lora_state_dict, lora_off, lora_parameters,
                  lora_state_dict, merge_lora, use_adapter)

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "data", "demo.jsonl")
FAMILIES = ["tiny", "tiny-opt"]  # Llama and OPT


def tiny(family="tiny", seed=0):
    texts = [p[k] for p in hp.make_demo_pairs(50) for k in ("prompt", "chosen", "rejected")]
    lm, tok = hp.build_tiny(family, texts, seed, "cpu")
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


# ---- lora.py -----------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("family", FAMILIES)
def test_new_adapter_changes_nothing_and_lora_off_is_bit_exact(family, batch):
    lm, _ = tiny(family)
    before = lm(batch).logits
    n = add_lora(lm, r=4)
    assert n == 2 * (6 if family == "tiny-opt" else 7)  # every linear map of the 2 decoder layers
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


def test_add_lora_rejects_unknown_targets():
    lm, _ = tiny()
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(lm, targets=("c_attn",))


# ---- HydraModel --------------------------------------------------------------------------------------------------

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
    ids, mask, P = hp.collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 2]], tok.pad_token_id)
    assert P == 3 and ids.tolist() == [[1, 5, 6, 8, 2, 0], [0, 1, 7, 9, 10, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    h = model(ids, mask)
    assert model.values(h, P).shape == (2, 3) and model.values(h, P).dtype == torch.float32
    lp, ent = model.logprobs(h, ids, P, entropy=True)
    assert lp.shape == ent.shape == (2, 3) and (lp <= 0).all() and (ent >= 0).all()


# ---- data --------------------------------------------------------------------------------------------------------

def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(l + "\n" for l in lines))
    return str(path)


def test_load_pairs_both_formats(tmp_path):
    plain = json.dumps(dict(prompt="Q?", chosen=" yes", rejected=" no"))
    hh = json.dumps(dict(chosen="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: fine, thanks",
                         rejected="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"))
    pairs = hp.load_pairs(write(tmp_path, [plain, "", hh]))
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
        hp.load_pairs(path)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_bad_data_on_the_command_line_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    r = run_cli("sft", "--data", missing, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {missing}: no such file"
    bad = write(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{oops"])
    r = run_cli("sft", "--data", bad, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}:2: invalid JSON (Expecting property name enclosed in "
                                             f"double quotes)"]


def test_split_is_deterministic_and_disjoint():
    pairs = hp.make_demo_pairs(100)
    a_train, a_eval = hp.split_pairs(pairs, 0.1, seed=3)
    b_train, b_eval = hp.split_pairs(pairs, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 90
    assert not {id(p) for p in a_eval} & {id(p) for p in a_train}
    assert hp.split_pairs(pairs, 0.1, seed=4)[1] != a_eval


def test_bundled_demo_data_is_what_the_generator_makes():
    pairs = hp.load_pairs(DEMO)
    assert pairs == hp.make_demo_pairs(len(pairs), seed=0)
    assert all(hp.gold_score(p["chosen"]) > hp.gold_score(p["rejected"]) for p in pairs)


# ---- checkpoints and Hydra-SFT -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_to_identical_outputs(tmp_path, family, batch):
    lm, tok = tiny(family)
    model = hp.HydraModel(lm)
    nn.init.normal_(model.reward_head.weight)
    mask = torch.ones_like(batch)
    h = model(batch, mask)
    want = (lm(batch).logits, model.score(h, mask))
    hp.save_checkpoint(str(tmp_path), model, tok, dict(task="hydra"))
    again, tok2, meta = hp.load_checkpoint(str(tmp_path), "cpu", torch.float32)
    again.eval()
    h2 = again(batch, mask)
    assert meta == dict(task="hydra") and tok2("good film")["input_ids"] == tok("good film")["input_ids"]
    assert torch.equal(again.lm(batch).logits, want[0]) and torch.equal(again.score(h2, mask), want[1])


def test_load_checkpoint_rejects_a_plain_folder(tmp_path):
    with pytest.raises(hp.UserError, match="not a hydra-ppo checkpoint"):
        hp.load_checkpoint(str(tmp_path), "cpu", torch.float32)


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
    model, tok, meta = hp.load_checkpoint(str(out), "cpu", torch.float32)
    assert meta["task"] == "hydra"
    cfg = hp.SFTConfig(**summary["config"])
    held_out = hp.split_pairs(hp.load_pairs(DEMO), cfg.eval_frac, cfg.seed)[1]
    again = hp.evaluate_sft(model, tok, held_out, cfg, torch.device("cpu"), hp.nullcontext)
    assert again["rm_acc"] == summary["held_out_rm_acc"]
    assert again["lm_loss"] == pytest.approx(summary["held_out_lm_loss"], abs=1e-5)


def test_sft_with_lora_merges_into_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = hp.SFTConfig(data=DEMO, out=str(tmp_path), steps=3, lora_r=4, task="sft", model="tiny-opt", device="cpu")
    summary = hp.sft(cfg)
    assert "held_out_lm_loss" in summary
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # an ordinary transformers model
    assert not any("lora" in n for n, _ in lm.named_parameters())


def test_help_lists_every_field():
    r = run_cli("sft", "--help")
    assert r.returncode == 0
    for f in hp.fields(hp.SFTConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout


# ---- PPO ---------------------------------------------------------------------------------------------------------

MODES = ["hydra", "jhydra", "dlora", "lora", "full"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny Hydra-SFT, SFT-only and RM-only checkpoints trained on the demo data (a few seconds in all)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for task, steps in (("hydra", 60), ("sft", 20), ("rm", 20)):
        out[task] = str(root / task)
        hp.sft(hp.SFTConfig(data=DEMO, out=out[task], task=task, steps=steps, device="cpu", seed=1))
    return out


def ppo_config(ckpts, mode, out="", **kw):
    hydra = mode in ("hydra", "jhydra")
    base = dict(mode=mode, sft=ckpts["hydra" if hydra else "sft"], rm="" if hydra else ckpts["rm"], data=DEMO,
                out=out, steps=2, batch_size=8, minibatch_size=4, micro_batch_size=2, lora_r=4, lora_alpha=8.0,
                max_response_len=8, eval_prompts=8, device="cpu")
    return hp.PPOConfig(**{**base, **kw})


def one_iteration(cfg, roles, opt, params, seed=0):
    tok = hp.load_tokenizer(cfg.sft)
    prompts = [hp.encode_prompt(tok, p["prompt"], 16) for p in hp.make_demo_pairs(cfg.batch_size, seed=seed)]
    p_ids, p_mask = hp.pad(prompts, tok.pad_token_id, "left")
    torch.manual_seed(seed)
    batch, _ = hp.rollout_batch(roles, tok, p_ids, p_mask, cfg, hp.nullcontext, cfg.kl_coef)
    stats = hp.ppo_update(roles, opt, params, batch, cfg, hp.nullcontext, torch.Generator().manual_seed(seed))
    return batch, stats


def base_storages(model):
    return {p.untyped_storage().data_ptr() for n, p in model.lm.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("mode,static_models,lora_sets", [
    ("hydra", 1, 2), ("jhydra", 1, 1), ("dlora", 2, 2), ("lora", 4, 2), ("full", 4, 0)])
def test_each_mode_holds_exactly_the_papers_models(ckpts, mode, static_models, lora_sets):
    cfg = ppo_config(ckpts, mode)
    roles = hp.build_roles(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    storages = set().union(*(base_storages(r.model) for r in roles.values()))
    per_model = len(base_storages(roles["actor"].model))
    assert len(storages) == static_models * per_model  # distinct copies of the base weights held in memory
    adapters = {(id(m), a) for m in hp.models_of(roles) for l in m.modules() if isinstance(l, LoRALinear)
                for a in l.lora_A}
    assert len(adapters) == lora_sets
    if mode in ("hydra", "jhydra"):  # reference and reward model are the actor's trunk with LoRA off
        assert roles["ref"].model is roles["reward"].model is roles["actor"].model
        assert roles["ref"].adapter is None and roles["reward"].adapter is None
    crit = roles["critic"].model
    assert torch.equal(crit.value_head.weight, crit.reward_head.weight)  # the critic starts from the reward model
    assert crit.value_head.weight.data_ptr() != crit.reward_head.weight.data_ptr()  # ... as its own parameters


def test_one_pass_per_trunk_and_adapter(ckpts):
    cfg = ppo_config(ckpts, "hydra")
    roles = hp.build_roles(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    groups = [sorted(n) for _, n in hp.passes(roles, ["actor", "critic", "ref", "reward"])]
    assert sorted(groups) == [["actor"], ["critic"], ["ref", "reward"]]
    cfg = ppo_config(ckpts, "jhydra")
    roles = hp.build_roles(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    assert sorted(sorted(n) for _, n in hp.passes(roles, list(roles))) == [["actor", "critic"], ["ref", "reward"]]


@pytest.mark.parametrize("mode", MODES)
def test_ppo_steps_change_only_what_the_mode_trains(ckpts, mode):
    cfg = ppo_config(ckpts, mode)
    roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    models = hp.models_of(roles)
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    trained = {id(p) for p in params}
    batch, stats = one_iteration(cfg, roles, opt, params)
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
    actor_group, critic_group = opt.param_groups
    assert any(id(p) in changed for p in actor_group["params"]), "the actor did not move"
    assert any(id(p) in changed for p in critic_group["params"]), "the critic did not move"
    if mode != "full":  # every LoRA mode: the base weights are bit-for-bit those of the checkpoints
        for name, role in roles.items():
            ckpt = cfg.rm if name in ("critic", "reward") and cfg.rm else cfg.sft
            fresh = hp.load_checkpoint(ckpt, CPU, torch.float32)[0].lm.state_dict()
            for k, v in role.model.lm.state_dict().items():
                if "lora_" not in k:
                    assert torch.equal(v, fresh[k.replace(".base.", ".")]), k


@pytest.mark.parametrize("mode", ["hydra", "jhydra"])
def test_reference_is_the_sft_model_exactly(ckpts, mode):
    cfg = ppo_config(ckpts, mode)
    roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    sft_model = hp.load_checkpoint(cfg.sft, CPU, torch.float32, dropout=False)[0].eval()
    plain = dict(ref=hp.Role(sft_model, None, "lm"), reward=hp.Role(sft_model, None, "reward"))
    for it in range(3):  # before and after PPO updates
        batch, _ = one_iteration(cfg, roles, opt, params, seed=it)
        ids, mask, P = batch["ids"], batch["mask"], batch["P"]
        for m in hp.models_of(roles):
            m.eval()
        ours = hp.score_rollout({k: roles[k] for k in ("ref", "reward")}, ids, mask, P, 2, hp.nullcontext)
        want = hp.score_rollout(plain, ids, mask, P, 2, hp.nullcontext)
        assert torch.equal(ours["ref"], want["ref"]) and torch.equal(ours["reward"], want["reward"])
    with hp.adapter_on(roles["actor"]):  # while the actor itself has moved away from the SFT model
        actor_lp = hp.score_rollout({"actor": roles["actor"]}, ids, mask, P, 2, hp.nullcontext)["actor"]
    assert not torch.equal(actor_lp, want["ref"])


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


def test_adaptive_kl_moves_beta_toward_the_target():
    assert hp.update_kl_coef(0.1, kl=12.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert hp.update_kl_coef(0.1, kl=3.0, target=6.0, n=100, horizon=1000) < 0.1


def test_ppo_learns_the_toy_and_saves_a_policy(ckpts, tmp_path, capsys):
    """A learnable toy: the reward model favours positive words, so the mean score rises over a short run."""
    out = str(tmp_path / "ppo")
    cfg = ppo_config(ckpts, "hydra", out=out, steps=16, batch_size=16, minibatch_size=8, micro_batch_size=8,
                     lora_r=8, lora_alpha=16.0, actor_lr=3e-3, critic_lr=3e-3, max_response_len=12, log_every=1,
                     eval_prompts=32, target_kl=1.0)
    summary = hp.ppo(cfg, judge=lambda prompts, responses: [hp.gold_score(r) for r in responses])
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
    # the saved adapters reproduce the trained policy
    capsys.readouterr()
    hp.generate_cmd(hp.GenerateConfig(run=out, greedy=True, device="cpu"))
    greedy = capsys.readouterr().out.strip()
    assert greedy
    actor, tok, _ = hp.load_policy(out, CPU, torch.float32)
    assert actor.adapter == "actor"


@pytest.mark.parametrize("args,message", [
    (["--mode", "dlora"], "needs a reward-model checkpoint"),
    (["--batch-size", "10", "--minibatch-size", "4"], "must be a multiple of --minibatch-size"),
    (["--sft", "/nonexistent"], "--sft /nonexistent: not found"),
])
def test_ppo_config_errors(ckpts, args, message):
    cfg = hp.parse_config(hp.PPOConfig, ["--sft", ckpts["hydra"], *args], "t")
    with pytest.raises(hp.UserError, match=message):
        hp.check_ppo_config(cfg)


@pytest.mark.parametrize("mode", ["hydra", "jhydra"])
def test_gradient_checkpointing_gives_the_same_update(ckpts, mode):
    """Checkpointed layers recompute their forward during backward; each pass's backward runs inside its own
    adapter context, so the critic's recomputation must not see the actor's adapter (or LoRA off)."""
    results = []
    for gc in (False, True):
        cfg = ppo_config(ckpts, mode, grad_checkpointing=gc)
        roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
        one_iteration(cfg, roles, opt, params)
        one_iteration(cfg, roles, opt, params, seed=1)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,gc", [(m, False) for m in MODES] + [("hydra", True), ("jhydra", True)])
def test_one_pass_setting_gives_the_two_pass_update_with_fewer_passes(ckpts, mode, gc, monkeypatch):
    """1 epoch, minibatch = micro-batch = batch: the update's forward is at theta_old, so its outputs replace the
    scoring pass of the actor (and of the critic when they share it). Same update, exact ratio of 1, fewer passes."""
    cfg = ppo_config(ckpts, mode, batch_size=4, minibatch_size=4, micro_batch_size=4, grad_checkpointing=gc)
    assert hp.one_pass(cfg) and not hp.one_pass(ppo_config(ckpts, mode)) and not hp.one_pass(cfg, B=8)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(hp, "one_pass", lambda cfg, B=None, fused=fused: fused)
        roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
        forwards = []
        for m in hp.models_of(roles):
            m.register_forward_hook(lambda *_: forwards.append(1))
        tok = hp.load_tokenizer(cfg.sft)
        prompts = [hp.encode_prompt(tok, p["prompt"], 16) for p in hp.make_demo_pairs(cfg.batch_size)]
        p_ids, p_mask = hp.pad(prompts, tok.pad_token_id, "left")
        torch.manual_seed(0)
        batch, stats = hp.ppo_step(roles, opt, params, tok, p_ids, p_mask, cfg, hp.nullcontext, cfg.kl_coef,
                                   torch.Generator().manual_seed(0))
        results[fused] = stats, [p.detach().clone() for p in params], batch, len(forwards)
    (s1, p1, b1, n1), (s2, p2, b2, n2) = results[True], results[False]
    assert torch.equal(b1["ids"], b2["ids"])
    shared = mode == "jhydra"  # actor and critic in one pass
    scoring = {"hydra": 3, "jhydra": 2, "dlora": 4, "lora": 4, "full": 4}[mode]  # passes in step 2 (+ 2 or 1 update)
    assert n2 - n1 == 1 and n1 == scoring - 1 + (1 if shared else 2)
    assert s1["ratio"] == 1.0 and s1["approx_kl"] == 0.0  # exactly: the old log-probs are this forward's own
    assert set(s1) == set(s2)  # the same metrics either way (ppo() reads kl, score, skipped from them)
    for k in ("score", "kl", "reward", "explained_var", "pg_loss", "vf_loss", "grad_norm"):
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
        roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
        randomize_lora(roles["actor"].model.lm, "actor")  # a trained-looking actor, so folding has work to do
        batch, _ = one_iteration(cfg, roles, opt, params)
        results.append((batch["ids"], [p.detach().clone() for p in params]))
    (ids0, p0), (ids1, p1) = results
    assert entered == ["actor"]  # sampling folded the actor once, and only with --fold-lora
    assert torch.equal(ids0, ids1)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- the whole pipeline (`python hydra_ppo.py`) ------------------------------------------------------------------

def test_pipeline_runs_every_stage_and_is_deterministic(tmp_path):
    small = ["--sft-steps", "40", "--ppo-steps", "3", "--batch-size", "8", "--minibatch-size", "4",
             "--micro-batch-size", "4", "--eval-prompts", "8", "--seed", "3", "--device", "cpu"]
    summaries = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = run_cli(*small, "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "1/2 Hydra-SFT" in r.stdout and "2/2 Hydra-PPO" in r.stdout and "verdict:" in r.stdout
        assert "win-rate of PPO over SFT (gold judge)" in r.stdout and "settings for the tiny model:" in r.stdout
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
    assert hp.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(hp.sparkline(list(range(500)), width=60)) == 60


# ---- reliability -------------------------------------------------------------------------------------------------

def metrics_without_time(path):
    rows = [json.loads(l) for l in open(path)]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


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
    state = cut / hp.STATE_FILE
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for a checkpoint after step 4, then kill -9
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
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
        hp.ppo(cfg)
    state = torch.load(out / hp.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["params"])
    log = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["skipped"] for r in log] == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_cuda_out_of_memory_becomes_a_message(ckpts, monkeypatch, capsys):
    def oom(cfg, judge=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setitem(hp.SUBCOMMANDS, "ppo", (hp.PPOConfig, oom))
    assert hp.main(["ppo", "--sft", ckpts["hydra"], "--batch-size", "64", "--max-response-len", "400"]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "--mode hydra" in err and "batch 64" in err and "400" in err
    assert "--grad-checkpointing" in err and "Traceback" not in err


# ---- export and chat templates -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo_runs(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for mode in ("hydra", "full"):
        runs[mode] = str(root / mode)
        hp.ppo(ppo_config(ckpts, mode, out=runs[mode], steps=3, actor_lr=1e-2, critic_lr=1e-2))
    return runs


def policy_logits(run, ids):
    actor, _, _ = hp.load_policy(run, CPU, torch.float32)
    with hp.adapter_on(actor):
        return actor.model.lm(ids).logits


@pytest.mark.parametrize("mode", ["hydra", "full"])
def test_export_merged_is_a_plain_checkpoint_with_the_same_outputs(ppo_runs, tmp_path, mode, batch):
    from transformers import AutoModelForCausalLM
    out = hp.export(hp.ExportConfig(run=ppo_runs[mode], format="merged", out=str(tmp_path / "m")))
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, LoRALinear) for m in lm.modules())
    want = policy_logits(ppo_runs[mode], batch)
    sft_dir = json.load(open(os.path.join(ppo_runs[mode], "run.json")))["sft"]
    sft = hp.load_checkpoint(sft_dir, CPU, torch.float32)[0]
    assert not torch.allclose(sft.lm(batch).logits, want, atol=1e-4)  # the policy did move away from SFT
    torch.testing.assert_close(lm(batch).logits, want, atol=1e-5, rtol=1e-5)


def test_export_peft_loads_in_peft(ppo_runs, tmp_path, batch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    out = hp.export(hp.ExportConfig(run=ppo_runs["hydra"], format="peft", out=str(tmp_path / "p")))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    sft_dir = json.load(open(os.path.join(ppo_runs["hydra"], "run.json")))["sft"]
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), out).eval()
    torch.testing.assert_close(model(batch).logits, policy_logits(ppo_runs["hydra"], batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(hp.UserError, match="needs a LoRA run"):
        hp.export(hp.ExportConfig(run=ppo_runs["full"], format="peft", out=str(tmp_path / "f")))


def test_chat_template_formats_hh_turns():
    _, tok = tiny()
    hh = "\n\nHuman: good film\n\nAssistant: nice\n\nHuman: bad song\n\nAssistant:"
    assert hp.to_messages(hh) == [dict(role="user", content="good film"), dict(role="assistant", content="nice"),
                                  dict(role="user", content="bad song")]
    assert hp.to_messages("review of the film :") == [dict(role="user", content="review of the film :")]
    with pytest.raises(hp.UserError, match="no chat template"):
        hp.encode_prompt(tok, hh, 64, chat=True)
    tok.chat_template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    ids = hp.encode_prompt(tok, hh, 64, chat=True)
    assert tok.decode(ids) == tok.decode(tok("user good film assistant nice user bad song assistant")["input_ids"])
    assert hp.encode_prompt(tok, hh, 3, chat=True) == ids[-3:]


# ---- data parallel -----------------------------------------------------------------------------------------------

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


def test_ranks_in_sync_detects_a_difference(tmp_path):
    """The fingerprint check itself, on 2 gloo processes where rank 1 holds a different weight."""
    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import hydra_ppo as hp\n"
        "hp.init_distributed('cpu')\n"
        "p = [torch.ones(3), torch.zeros(2)]\n"
        "same = hp.ranks_in_sync(p)\n"
        "if dist.get_rank() == 1: p[1][0] = 1e-6\n"
        f"open(os.path.join({str(tmp_path)!r}, f'rank{{dist.get_rank()}}'), 'w').write(f'{{same}} {{hp.ranks_in_sync(p)}}')\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(tmp_path / f"rank{i}").read_text() for i in (0, 1)] == ["True False", "True False"]


# ---- found in review ---------------------------------------------------------------------------------------------

def test_evaluation_after_a_checkpointed_update_matches_eval_mode(ckpts):
    """ppo_update leaves the models in train(); with checkpointing on, transformers would then generate without
    its KV cache. evaluate_ppo must put them in eval() itself."""
    cfg = ppo_config(ckpts, "hydra", grad_checkpointing=True, eval_prompts=8)
    roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    one_iteration(cfg, roles, opt, params)
    assert all(m.training for m in hp.models_of(roles))
    tok = hp.load_tokenizer(cfg.sft)
    prompts = [p["prompt"] for p in hp.make_demo_pairs(8, seed=5)]
    torch.manual_seed(0)
    after_update = hp.evaluate_ppo(roles, tok, prompts, cfg, CPU, hp.nullcontext)
    for m in hp.models_of(roles):
        m.eval()
    torch.manual_seed(0)
    assert hp.evaluate_ppo(roles, tok, prompts, cfg, CPU, hp.nullcontext) == after_update


def test_logprobs_use_the_sampling_temperature(batch):
    lm, tok = tiny()
    model = hp.HydraModel(lm)
    mask = torch.ones_like(batch)
    h = model(batch, mask)
    want = (lm(batch).logits[:, 3:-1] / 0.7).log_softmax(-1).gather(-1, batch[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(model.logprobs(h, batch, 4, temperature=0.7), want, atol=1e-5, rtol=1e-5)


def test_generation_ignores_the_checkpoints_sampling_settings():
    lm, tok = tiny()
    role = hp.Role(hp.HydraModel(lm), None, "lm")
    p_ids, p_mask = hp.pad([hp.encode_prompt(tok, "review of the film :", 16)] * 4, tok.pad_token_id, "left")
    torch.manual_seed(0)
    clean = hp.generate(role, p_ids, p_mask, tok, 8)[0]
    lm.generation_config.repetition_penalty = 5.0  # what a checkpoint's generation_config.json may carry
    lm.generation_config.no_repeat_ngram_size = 1
    lm.generation_config.top_k = 3
    torch.manual_seed(0)
    assert torch.equal(hp.generate(role, p_ids, p_mask, tok, 8)[0], clean)


def test_sft_and_rm_with_different_tokenizers_are_refused(ckpts, tmp_path):
    other = write(tmp_path, [json.dumps(dict(prompt="zz yy", chosen="xx ww", rejected="vv uu"))] * 4)
    rm = str(tmp_path / "rm")
    hp.sft(hp.SFTConfig(data=other, out=rm, task="rm", steps=1, device="cpu"))
    cfg = ppo_config(ckpts, "dlora", rm=rm)
    with pytest.raises(hp.UserError, match="different tokenizers"):
        hp.check_ppo_config(cfg)


def test_unknown_lora_targets_are_one_line(ckpts):
    cfg = ppo_config(ckpts, "hydra", lora_targets="query_key_value")
    with pytest.raises(hp.UserError, match="no nn.Linear named like.*--lora-targets"):
        hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))


# ---- issue 12: paths, warnings, full-mode defaults, pipeline settings, what SFT reports, evaluation noise ---------

def test_run_json_holds_absolute_paths_that_work_from_another_directory(ckpts, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # a run started with relative paths ...
    hp.ppo(ppo_config(ckpts, "hydra", sft=os.path.relpath(ckpts["hydra"]), data=os.path.relpath(DEMO), out="run",
                      steps=1))
    saved = json.load(open(work / "run" / "run.json"))
    assert all(os.path.isabs(saved[k]) for k in ("sft", "data", "out")) and saved["rm"] == ""
    monkeypatch.chdir(elsewhere)  # ... is used from another directory
    run = str(work / "run")
    capsys.readouterr()
    hp.generate_cmd(hp.GenerateConfig(run=run, max_new_tokens=4, device="cpu"))
    assert capsys.readouterr().out.strip()
    hp.export(hp.ExportConfig(run=run, format="peft", out=str(tmp_path / "peft")))
    assert hp.ppo(hp.PPOConfig(resume=run))["steps"] == 1  # nothing left to train: it evaluates the saved state


def test_paths_that_do_not_exist_are_not_found(ckpts, tmp_path):
    with pytest.raises(hp.UserError, match="nope: not found"):
        hp.load_policy(str(tmp_path / "nope"), CPU, torch.float32)
    run = tmp_path / "run"  # a run whose SFT checkpoint has since been deleted
    run.mkdir()
    hp.write_json(str(run / hp.RUN_FILE), hp.asdict(hp.PPOConfig(sft=str(tmp_path / "gone"))))
    (run / hp.POLICY_FILE).write_bytes(b"")
    with pytest.raises(hp.UserError, match="gone: not found"):
        hp.load_policy(str(run), CPU, torch.float32)
    with pytest.raises(hp.UserError, match="--sft .*gone: not found"):
        hp.check_ppo_config(hp.PPOConfig(sft=str(tmp_path / "gone")))
    with pytest.raises(hp.UserError, match="--resume .*gone: not found"):
        hp.ppo(hp.PPOConfig(resume=str(tmp_path / "gone")))


@pytest.mark.parametrize("greedy", [False, True])
def test_generate_prints_no_warnings(greedy):
    """transformers >= 5.24 warned on every call about our own settings (min_new_tokens and min_length both set;
    sampling flags with greedy decoding): 68 lines in the demo."""
    import logging
    import warnings
    lm, tok = tiny()
    role = hp.Role(hp.HydraModel(lm), None, "lm")
    p_ids, p_mask = hp.pad([hp.encode_prompt(tok, "review of the film :", 16)] * 2, tok.pad_token_id, "left")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    if hasattr(logging.Logger, "warning_once"):  # transformers says some things once per process: say them again
        logging.Logger.warning_once.cache_clear()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kw in (dict(), dict(temperature=0.7, top_k=5, top_p=0.9), dict(min_new_tokens=3)):
                ids, mask, _ = hp.generate(role, p_ids, p_mask, tok, 6, greedy=greedy, **kw)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    assert (mask[:, p_ids.shape[1]:].sum(1) >= 3).all()  # min_new_tokens still holds EOS back


def test_full_fine_tuning_gets_its_own_learning_rates(ckpts):
    """LoRA's 5e-4 on every weight of the model gave a KL of 32 after 2 steps: full fine-tuning defaults to the
    paper's full fine-tuning scale (5e-7 actor, 1e-6 critic); an explicit rate always wins."""
    def lrs(cfg):
        return [g["lr"] for g in hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))[1].param_groups]
    assert hp.PPOConfig().actor_lr == hp.PPOConfig().critic_lr == 0.0  # 0: by mode
    assert lrs(ppo_config(ckpts, "full")) == [5e-7, 1e-6]
    assert lrs(ppo_config(ckpts, "hydra")) == [5e-4, 5e-5]
    assert lrs(ppo_config(ckpts, "full", actor_lr=1e-5, critic_lr=2e-5)) == [1e-5, 2e-5]
    assert hp.learning_rates(ppo_config(ckpts, "lora", critic_lr=1e-4)) == (5e-4, 1e-4)


def test_full_mode_reference_is_the_initial_policy_in_bf16(ckpts):
    """On CUDA frozen trunks load in bf16 and the trained copies in fp32 (master weights, autocast). In full mode the
    reference and reward model must still equal the initial actor and critic exactly: KL 0 at step 1."""
    cfg = ppo_config(ckpts, "full")
    roles, opt, params = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.bfloat16))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    tok = hp.load_tokenizer(cfg.sft)
    prompts = [hp.encode_prompt(tok, p["prompt"], 16) for p in hp.make_demo_pairs(cfg.batch_size)]
    p_ids, p_mask = hp.pad(prompts, tok.pad_token_id, "left")
    torch.manual_seed(0)
    batch, stats = hp.rollout_batch(roles, tok, p_ids, p_mask, cfg, autocast, cfg.kl_coef)
    assert torch.equal(batch["logprobs"], batch["ref_logprobs"]) and stats["kl"] == 0.0
    with torch.no_grad(), autocast():
        h_critic = roles["critic"].model(batch["ids"], batch["mask"])
        h_reward = roles["reward"].model(batch["ids"], batch["mask"])
    assert torch.equal(h_critic, h_reward)


def test_pipeline_settings_follow_the_model(tmp_path, capsys):
    """The pipeline's tiny-model settings (lr 3e-3, r 8, 16 tokens) are wrong for a pretrained model: 0 means
    "by model" (one table, PIPELINE_SETTINGS), the choice is printed in one line, explicit flags win."""
    cfg = hp.pipeline_settings(hp.PipelineConfig())
    assert (cfg.lora_r, cfg.actor_lr, cfg.max_response_len, cfg.sft_steps) == (8, 3e-3, 16, 300)
    assert "settings for the tiny model:" in capsys.readouterr().out
    lm, tok = tiny()  # any model that is not built in memory counts as a real one; here a tiny Llama in a folder
    lm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = hp.pipeline_settings(hp.PipelineConfig(model=str(tmp_path / "m")))
    assert {k: getattr(cfg, k) for k in hp.PIPELINE_SETTINGS["real"]} == hp.PIPELINE_SETTINGS["real"]
    n = sum(p.numel() for p in lm.parameters())
    line = capsys.readouterr().out
    assert f"settings for a {hp.model_size(n)} model:" in line and "--lora-r 16," in line
    cfg = hp.pipeline_settings(hp.PipelineConfig(model=str(tmp_path / "m"), lora_r=4, actor_lr=1e-3))
    assert (cfg.lora_r, cfg.actor_lr, cfg.lora_alpha) == (4, 1e-3, hp.PIPELINE_SETTINGS["real"]["lora_alpha"])
    assert hp.model_size(134_515_008) == "135M" and hp.model_size(6_738_415_616) == "6.7B"


@pytest.mark.parametrize("task,trained,untrained", [("sft", "lm_loss", "rm_acc"), ("rm", "rm_acc", "lm_loss")])
def test_sft_reports_only_what_it_trained(tmp_path, capsys, task, trained, untrained):
    summary = hp.sft(hp.SFTConfig(data=DEMO, out=str(tmp_path), task=task, steps=1, device="cpu"))
    printed = capsys.readouterr().out
    on_disk = json.load(open(tmp_path / "summary.json"))
    for s in (summary, on_disk):
        assert "held_out_" + trained in s and "held_out_" + untrained not in s
    assert ("LM loss" in printed) == (task == "sft") and ("accuracy" in printed) == (task == "rm")


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
    roles, _, _ = hp.setup_ppo(cfg, hp.checkpoint_loader(cfg, CPU, torch.float32))
    tok = hp.load_tokenizer(cfg.sft)
    prompts = [p["prompt"] for p in hp.make_demo_pairs(5, seed=5)]
    judged = []

    def judge(ps, rs):
        judged.append(len(rs))
        return [hp.gold_score(r) for r in rs]
    torch.manual_seed(0)
    metrics, samples = hp.evaluate_ppo(roles, tok, prompts, cfg, CPU, hp.nullcontext, judge)
    assert judged == [15, 15]  # policy and SFT: 3 responses to each of the 5 prompts
    assert len(samples) == 5 and metrics["eval_samples"] == 3 and metrics["eval_prompts"] == 5
    lo, hi = metrics["win_rate_ci"]
    assert lo <= metrics["win_rate"] <= hi and metrics["verdict"] == hp.verdict((lo, hi))
