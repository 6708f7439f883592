"""`TrainState`: everything a training run carries from step to step, in one object that
saves, loads, snapshots and restores itself.

Saved without pickle as `train_state.safetensors` (raw and EMA weights, the post-hoc
EMA profiles when the run keeps them, optimizer moments, the batch generator's and
torch's RNG states; the optimizer's hyper-parameters as JSON metadata) beside
`model.safetensors` (the EMA weights, enough to sample). So a resumed run continues the
same random sequence, bit for bit.

`NonFiniteGuard` watches the loss and, when it turns NaN, stops before a bad state is
saved or rolls the state back to its last good snapshot.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcli import checkpoint, ema
from diffcli.config import RunConfig, to_dict
from diffcli.devices import fused_adamw
from diffcli.distributed import World, max_over_ranks
from diffcli.errors import UserError, listed
from diffcli.runs import MODEL_FILE, STATE_FILE, state_path
from diffcli.spec import LabelReading, Trained
from diffcli.unet import UNet

log = logging.getLogger("diffcli")

MAX_ROLLBACKS = 3  # with on_nonfinite=rollback: give up after this many


@dataclass
class TrainState:
    net: torch.nn.Module  # the weights being trained
    ema: torch.nn.Module  # their exponential moving average: what is sampled
    opt: torch.optim.Optimizer
    batch_gen: torch.Generator  # timesteps, noise, label dropout and flips (CPU)
    profiles: list[torch.nn.Module]  # power-function EMAs for post-hoc EMA (ema.PROFILES), or none
    step: int = 0
    labels: LabelReading | None = None  # the EMA's label knowledge and gain when last measured (fitting._checkpoint)

    @classmethod
    def create(cls, cfg: RunConfig, device: torch.device, layout: torch.memory_format) -> TrainState:
        """A fresh state: weights from torch's global generator (seed it first), as usual."""
        tc = cfg.train
        net = UNet(cfg.model).to(device, memory_format=layout)
        averaged = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=fused_adamw(device))
        profiles = [copy.deepcopy(averaged) for _ in ema.PROFILES] if tc.ema_snapshot_every else []
        return cls(net, averaged, opt, torch.Generator().manual_seed(tc.seed), profiles)

    def average(self, decay: float) -> None:
        """Fold the weights after step `self.step + 1` into the EMA and the profiles."""
        t = self.step + 1
        ema.update(self.ema, self.net, ema.classic_decay(t, decay))
        for sigma_rel, profile in zip(ema.PROFILES, self.profiles):
            ema.update(profile, self.net, ema.power_decay(t, sigma_rel))

    def trained(self, cfg: RunConfig) -> Trained:
        """What the guidance rule reads of the EMA at this step."""
        knowledge, gain = self.labels or (None, None)
        return Trained(cfg.images_seen(self.step), knowledge, gain)

    # --- files -----------------------------------------------------------------------

    def save(self, out: Path, cfg: RunConfig, class_names: list[str], epoch: float) -> None:
        """train_state.safetensors, then model.safetensors, each written atomically."""
        opt_sd = self.opt.state_dict()
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update({f"profile{i}.{k}": v for i, p in enumerate(self.profiles) for k, v in p.state_dict().items()})
        for pid, st in opt_sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.batch"] = self.batch_gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        metadata = {"format": checkpoint.FORMAT, "config": json.dumps(to_dict(cfg)), "class_names": json.dumps(class_names),
                    "step": str(self.step), "epoch": repr(epoch), "optimizer": json.dumps({"param_groups": opt_sd["param_groups"]}),
                    **checkpoint.labels_entry(self.labels)}
        checkpoint.save_tensors(out / STATE_FILE, tensors, metadata)
        checkpoint.save_model(out / MODEL_FILE, self.ema.state_dict(), to_dict(cfg), class_names, self.step, epoch,
                              self.labels, _tuning_at(out / MODEL_FILE, self.step))

    def load(self, out: Path) -> None:
        """Continue from the run in `out`: weights, moments, RNG states and step."""
        from safetensors.torch import load_file

        path = state_path(out)
        header = checkpoint.read_header(path)
        meta = checkpoint.model_metadata(header)
        if checkpoint.file_kind(header) == "model":  # e.g. a model.safetensors copied over it
            raise UserError(f"cannot resume: '{path}' is a model, not the training state `diffcli train` writes beside it.")
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise UserError(f"cannot resume: '{path}' is damaged ({e}).") from None
        try:
            self.net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        except RuntimeError:
            raise UserError(f"cannot resume: '{path}' holds another network than this run's config describes.") from None
        for i, profile in enumerate(self.profiles):
            profile.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"profile{i}.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        param_groups = json.loads(header["__metadata__"]["optimizer"])["param_groups"]
        self.opt.load_state_dict({"state": state, "param_groups": param_groups})
        # Saved moments come back contiguous; give them their parameter's layout (channels_last, mostly),
        # since the fused AdamW kernel walks a parameter and its moments as flat memory.
        for param, st in self.opt.state.items():
            for name, value in st.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    st[name] = torch.empty_like(param).copy_(value)
        self.batch_gen.set_state(tensors["rng.batch"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.labels = meta["step"], checkpoint.label_reading(meta)
        _dropped_tuning(out / MODEL_FILE)

    # --- in memory (the rollback after a non-finite loss) -------------------------------

    def snapshot(self) -> tuple:
        return (self.step, *(copy.deepcopy(m.state_dict()) for m in (self.net, self.ema, self.opt, *self.profiles)),
                self.batch_gen.get_state())

    def restore(self, snap: tuple) -> None:
        self.step, net_sd, ema_sd, opt_sd, *profile_sds, gen_state = snap
        self.net.load_state_dict(net_sd)
        self.ema.load_state_dict(ema_sd)
        for profile, sd in zip(self.profiles, profile_sds):
            profile.load_state_dict(sd)
        self.opt.load_state_dict(copy.deepcopy(opt_sd))
        self.batch_gen.set_state(gen_state)


class NonFiniteGuard:
    """Notices a NaN/inf loss on the step it happens without a host sync per step: each
    step records, on the device, the first step whose loss was not finite; `check` reads
    that once per LOG_EVERY steps and before every checkpoint, so a bad state is never saved.

    mode "stop": raise with the step and advice; the last checkpoint stays intact.
    mode "rollback": go back to the state kept at the last good check, halve the learning
    rate, and continue (at most MAX_ROLLBACKS times).
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.last_good = None  # a TrainState.snapshot() from the last check that found the loss finite

    def watch(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(loss), step)

    def check(self, state: TrainState, out: Path, report, world: World = World(), final: bool = False) -> bool:
        """True when it rolled `state` back; raises when the loss went bad and it cannot."""
        bad = int(max_over_ranks(world, self.first_bad).item())  # every rank sees the same verdict
        rollback = self.mode == "rollback" and not final
        if bad < 0:
            if rollback:
                self.last_good = state.snapshot()
            return False
        if rollback and self.last_good is not None and self.rollbacks < MAX_ROLLBACKS:
            state.restore(self.last_good)
            self.first_bad.fill_(-1)
            self.lr_scale *= 0.5
            self.rollbacks += 1
            report("notice", message=f"the loss was not finite at step {bad}; rolled back to step {state.step} "
                                     f"and halved the learning rate (rollback {self.rollbacks} of {MAX_ROLLBACKS}).")
            return True
        saved = checkpoint.model_metadata(checkpoint.read_header(out / MODEL_FILE))["step"] if (out / MODEL_FILE).exists() else None
        kept = f"the last checkpoint (step {saved}) in '{out}' is intact" if saved is not None else "no checkpoint had been saved yet"
        if self.mode == "rollback":  # (the advice not to repeat the option already given)
            why = (f"{MAX_ROLLBACKS} rollbacks did not mend it" if self.rollbacks >= MAX_ROLLBACKS else
                   "no good state had been kept yet" if self.last_good is None else "it went bad in the last steps")
            advice = f"--on-nonfinite rollback could not recover ({why}): lower --lr and keep --grad-clip on."
        else:
            advice = "Lower --lr, keep --grad-clip on, or pass --on-nonfinite rollback."
        raise UserError(f"the loss became NaN or infinite at step {bad}; {kept}. {advice}")


def check_classes(out: Path, class_names: list[str]) -> None:
    """Refuse to resume on data whose classes are not the run's: class i of the model must
    stay class i (a renamed, added or removed class folder renumbers them)."""
    saved = checkpoint.model_metadata(checkpoint.read_header(state_path(out)))["class_names"]
    if saved != class_names:
        raise UserError(f"cannot resume: the run learned the classes {listed(saved)}, and the data now has {listed(class_names)}; "
                        "train a new run (another --out) on the changed data.")


def _tuned(model: Path) -> tuple[dict | None, int]:
    """The tuned guidance entry (tuning.py) of a run's model file, and its step."""
    try:
        meta = checkpoint.model_metadata(checkpoint.read_header(model))
    except (UserError, OSError):
        return None, -1
    return meta["tuned_guidance"], meta["step"]


def _tuning_at(model: Path, step: int) -> dict | None:
    """The tuned entry to keep in a checkpoint of `step`: the file's, while it is that step's
    (a resume that trained nothing writes the same weights), else none: it was measured on others."""
    tuned, at = _tuned(model)
    return tuned if at == step else None


def _dropped_tuning(model: Path) -> None:
    """Say that a tuned guidance weight goes with the weights it was measured on."""
    tuned, _ = _tuned(model)
    if tuned:
        log.warning("the model's tuned guidance weight %g goes with the first checkpoint of new steps, whose weights it "
                    "was not measured on; run `diffcli tune-guidance` again when training ends", tuned["weight"])
