"""The optimizers of a run (plumbing of train.py): the release's two (`make_optimizers`), and an
Adam/AdamW step that updates a large parameter a block of rows at a time.

torch's Adam, a parameter at a time (foreach=False), builds two temporaries as large as the
parameter for its denominator (sqrt(v), then sqrt(v) / c): at Amazon-3M the classifier's weight is
1.34 GiB in float32, so its step alone would take 2.68 GiB more. `RowBlocks` runs the very same
arithmetic (torch's own functional Adam) on blocks of rows, so the temporaries are a block's; every
element sees the same step count, so the bits are those of foreach=False (tests/test_train.py).
"""
import torch
from torch.optim.adam import adam as adam_update

BLOCK_ELEMENTS = 1 << 24  # elements of a parameter updated at once (64 MiB of float32 temporaries)


def make_optimizers(config, network):
    """The release's two optimizers. The encoder's: the encoder's weights with weight decay, its
    biases and LayerNorm weights without, the meta head and the intermediate layer with learning
    rates of their own (and the optimizer's default weight decay). The classifier's: AdamW, or SGD
    with momentum 0.9. no_decay "names" finds biases and LayerNorm weights as the release does, by
    name, which misses DistilBERT's `sa_layer_norm` and `output_layer_norm` and so decays them."""
    norms = {id(p) for m in network.encoder.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    exempt = {id(p) for n, p in network.encoder.named_parameters()
              if (n.endswith("bias") or id(p) in norms if config.no_decay == "modules"
                  else "bias" in n or "LayerNorm.weight" in n)}
    encoder = [p for p in network.encoder.parameters() if p.requires_grad]  # (a frozen one: none)
    groups = [{"params": [p for p in encoder if id(p) not in exempt], "weight_decay": config.weight_decay_encoder},
              {"params": [p for p in encoder if id(p) in exempt], "weight_decay": 0.0}]
    for module, lr in ((network.meta, config.lr_meta), (network.intermediate, config.lr_intermediate)):
        if module is not None:
            groups.append({"params": list(module.parameters()), "lr": lr})
    # for-loop: a parameter at a time (Adam's a block of rows at a time), the same bits as foreach
    # (torch's choice on a GPU) without its temporaries as large as a whole parameter group; fused:
    # one kernel, bits that differ slightly
    loop = {"auto": {}, "foreach": dict(foreach=True), "for-loop": dict(foreach=False),
            "fused": dict(fused=True)}[config.optimizer_loop]
    row_blocks = config.optimizer_loop == "for-loop"
    adam, adamw = (RowBlockAdam, RowBlockAdamW) if row_blocks else (torch.optim.Adam, torch.optim.AdamW)
    encoder_class = {"adamw": adamw, "adam": adam}[config.encoder_optimizer]
    encoder_optimizer = encoder_class([g for g in groups if g["params"]] or [{"params": []}], lr=config.lr_encoder, **loop)
    classifier, lr, decay = network.classifier.parameters(), config.lr_classifier, config.weight_decay_classifier
    if config.classifier_optimizer == "sgd":
        return [encoder_optimizer, torch.optim.SGD(classifier, lr=lr, momentum=0.9, weight_decay=decay, **loop)]
    return [encoder_optimizer, adamw(classifier, lr=lr, weight_decay=decay, **loop)]


class RowBlocks:
    """Mixin for torch.optim.Adam / AdamW (foreach=False, no amsgrad): step() a block of rows at a time."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            if group["amsgrad"]:
                raise ValueError("RowBlocks has no amsgrad")
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:  # as torch's Adam starts one: a step count on the CPU, zero moments
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                tensors = [t.view(len(p) if p.dim() else 1, -1)  # [rows, row]: a scalar is one row
                           for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                rows = max(1, BLOCK_ELEMENTS // tensors[0].shape[1])
                for start in range(0, len(tensors[0]), rows):
                    param, grad, exp_avg, exp_avg_sq = ([t[start:start + rows]] for t in tensors)
                    adam_update(param, grad, exp_avg, exp_avg_sq, [], [state["step"].clone()], foreach=False,
                                decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=False,
                                beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
                state["step"] += 1
        return loss


class RowBlockAdam(RowBlocks, torch.optim.Adam):
    pass


class RowBlockAdamW(RowBlocks, torch.optim.AdamW):
    pass
