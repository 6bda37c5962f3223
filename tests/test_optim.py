"""The optimizer clipa builds: AdamW with CLIP's decay exclusions, on the fused kernel where torch has one."""

import copy

import torch

from clipa.model.build import Geometry, create_model, stage_config
from clipa.recipe.schema import OptimConfig
from clipa.train.optim import build_optimizer


def test_fused_adamw_matches_the_reference_update_with_decay_exclusions():
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", Geometry(32, 8)))
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.2)
    optimizer = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"]  # this torch has the CPU kernel (torch >= 2.4)
    decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in optimizer.param_groups[0]["params"])
    assert any(names[i] == "logit_scale" for i in map(id, optimizer.param_groups[1]["params"]))

    # The same update by hand-picked plain AdamW groups, torch's per-tensor loop implementation.
    ref_params = dict(reference.named_parameters())
    ref_groups = [{"params": [ref_params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in optimizer.param_groups]
    ref_optimizer = torch.optim.AdamW(ref_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    for step in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            g = torch.randn_like(p) * (step + 1)
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        ref_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert decay and len(decay) < len(names)


def test_decay_embeddings_false_leaves_only_layer_matrices_decayed_as_clipa_jax():
    model = create_model(stage_config("clipa-tiny", Geometry(32, 8)))
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(**kwargs):
        return {names[id(p)] for p in build_optimizer(model, OptimConfig(**kwargs)).param_groups[0]["params"]}

    clip_rule, jax_rule = decayed(), decayed(decay_embeddings=False)
    embeddings = {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
    assert embeddings <= clip_rule  # CLIP / open_clip decay every matrix, tables included
    assert clip_rule - jax_rule == embeddings
    assert {"visual.conv1.weight", "visual.proj", "text_projection"} <= jax_rule  # JAX kernels: still decayed
