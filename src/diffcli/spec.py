"""`SamplerSpec`: how a trained model is sampled, resolved and checked once.

Every caller that draws images (`sample`, `compare`, `eval`, the training grids, the
benchmarks) builds one of these and calls `resolve(T)`: it fills the defaults that depend
on the model (the step count) and refuses what cannot run, in one sentence naming the
option. Torch-free, so the command line can show the defaults in `--help` cheaply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from diffcli.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, bounded, check_fields
from diffcli.errors import UserError

# euler is deterministic DDIM by the name flow matching knows it: DDIM is Euler's method on the
# probability-flow ODE in σ (Karras et al. 2022, §3), and on a flow model it is Euler on dx/ds = v.
SAMPLERS = ("ddpm", "ddim", "euler", "dpm++", "heun")
DDIM_SAMPLERS = ("ddim", "euler")  # the two names of one sampler
# ddpm always runs all T steps; heun evaluates the network twice a step (2 x steps - 1 in all)
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "heun": 25}
DEFAULT_STEPS["euler"] = DEFAULT_STEPS["ddim"]
SPACINGS = ("trailing", "karras")  # how the steps are spread over 0..T-1 (samplers.plan)
VARIANCES = ("beta_tilde", "beta")  # DDPM's step variance: the posterior's β̃_t, or β_t

# Classifier-free guidance weight of `diffcli sample`, `diffcli eval` and the training
# grids when --guidance is not given: it follows how far the model is trained, because a
# model that has seen few images needs guidance to draw its classes at all, and a better
# one pays for the same guidance in diversity only (docs/results.md, "Right and varied").
# Measured with DDIM 50 and the augmented reference classifiers (accuracy / classifier-FD):
#   shapes, 1,000 steps of 32 (32k images): w 2 60.2% / 5.30, 2.5 66.6% / 4.69, 3 71.6% / 4.49;
#   MNIST, 2,400 steps (77k; the plain classifier): 1.5 97.6% / 0.40, 2 99.8% / 0.76, 2.5 / 1.21;
#   MNIST, 5,319 steps (170k): 1 95.3% / 0.32, 1.3 98.1% / 0.19, 1.5 99.2% / 0.30, 2 99.8% / 0.80.
# So w falls by GUIDANCE_PER_DOUBLING for each doubling of the images seen past
# GUIDANCE_AT images, within [GUIDANCE_FLOOR, GUIDANCE_CEILING]: the floor because even
# long-trained models score best with some guidance (EDM2's best FID is at w 1.2-1.4), the
# ceiling because beyond 3 shapes' FD turns (eps at 1,000 steps: 4.48 at w 3, 7.00 at 5).
GUIDANCE_AT = (77_000, 2.0)  # (images seen, w)
GUIDANCE_PER_DOUBLING = 0.6
GUIDANCE_FLOOR, GUIDANCE_CEILING = 1.25, 3.0
DEFAULT_GUIDANCE = 2.0  # a model whose training is unknown (an import): the middle of the rule
# Where the label steers the network little (the label knowledge `diffcli train` measures at
# checkpoints, knowledge.py: 0 chance, 1 always right) the classes need guidance for longer. Digits
# and shapes know their labels early (MNIST 0.88 after 2,000 steps; shapes 0.99-1.0) and follow the
# rule above. CIFAR-10's photos learn them slowly (0.30, 0.36, 0.40, 0.45 after 275k, 841k, 2.52M,
# 4.10M images: 10, 30, 90, 146 CPU-minutes at batch 64), and their best weights, 3 or more, 2.5, 2,
# 1.75, fall about half as fast and from later: w = 2 at SLOW_GUIDANCE_AT images, less
# SLOW_PER_DOUBLING a doubling, meets all four; at a fifth point, not fitted (5.05M images, 100
# epochs, knowledge 0.44), its 1.7 scored 4.4x the classifier-FD floor against 5.7x at 1.5 and 5.1x
# at 2 (docs/results.md, "The rule mended"). Knowledge picks the rule, it does not scale the images:
# a rule that did (r = knowledge / 0.8 weighting each doubling) moved the weight 0.45 for
# knowledge's rise of 0.05 from 90 to 146 minutes, and drew 10.7x the FD floor where the best weight
# drew 4.7x. Up to KNOWLEDGE_SLOW the photos' rule, from KNOWLEDGE_FULL the digits', and between
# them the weight moves linearly from one to the other. The band is where two sets meet that the
# knowledge alone barely tells apart (docs/results.md, "Fashion-MNIST"): CIFAR-10's four vehicles want
# the photos' rule at 0.55 (3.5 beat 2.7) and half of each at 0.65 (2 best, 1.5 far worse), while
# Fashion-MNIST, whose knowledge stays at 0.68-0.70 from 3 to 10 CPU-minutes (shirts, T-shirts,
# pullovers and coats stay alike under the noise), wants the digits' at 10 minutes (1.25: 1.04x the
# FD floor, where the band 0.5-0.8 this replaced gave 1.7: 1.81x). A model without the measure
# (trained before it, imported) follows the digits' rule; `diffcli ema`'s models carry their run's value.
SLOW_GUIDANCE_AT = (2_500_000, 2.0)  # (images seen, w)
SLOW_PER_DOUBLING = 0.32
KNOWLEDGE_SLOW, KNOWLEDGE_FULL = 0.6, 0.7
# Knowledge alone mistakes classes that look alike for a model that does not know them. The
# label's gain (knowledge.label_gain: the share of the network's error its label takes away) tells
# them apart: Fashion-MNIST's four tops (T-shirt, pullover, coat, shirt) know their labels no better
# than the vehicles (0.53 against 0.59) but their label moves more of the picture (gain 0.034-0.039
# on three picks of 1,024 images, against at most 0.019 for every photo set measured), and at 10 minutes the digits'
# 1.25 drew them at 1.14x the classifier-FD floor where the photos' 2.7 drew 6.6x (docs/results.md,
# "A second reading"). So the photos' rule needs both readings low: up to GAIN_SLOW it holds, from
# GAIN_FULL the digits' rule does whatever the knowledge, linearly between. GAIN_SLOW sits above
# where CIFAR-10's gain would be at 100 epochs if it kept rising as from 10 to 30 minutes (0.016 to
# 0.019: 0.023), so its long runs keep the weights they drew best with; GAIN_FULL at the tops' lowest.
GAIN_SLOW, GAIN_FULL = 0.025, 0.033


class Trained(NamedTuple):
    """What the guidance rule reads about a model's training."""
    images: int | None  # training images seen; None or 0: unknown (an import)
    knowledge: float | None = None  # knowledge.label_knowledge; None: not measured
    gain: float | None = None  # knowledge.label_gain; None: not measured (a model trained before it)
    tuned: float | None = None  # the weight `diffcli tune-guidance` chose by measurement; the rule defers to it


class LabelReading(NamedTuple):
    """What training reads of a model's labels (knowledge.py), saved with the model."""
    knowledge: float
    gain: float | None = None


def knowledge_can_matter(images: int | None) -> bool:
    """Whether the label knowledge could change the weight of a model that has seen
    `images`: not where both rules give the same (the ceiling early, the floor late).
    Training measures it only where it can (fitting.py)."""
    return default_guidance(Trained(images, 0.0)) != default_guidance(Trained(images))


def default_guidance(trained: Trained | None) -> float:
    """The guidance weight for a model with this training, rounded to 0.05 so that the
    weight a command prints is the one used. A weight chosen by measurement (tuning.py) wins."""
    if trained is not None and trained.tuned is not None:
        return trained.tuned
    if trained is None or not trained.images:
        return DEFAULT_GUIDANCE
    early = _falling(trained.images, GUIDANCE_AT, GUIDANCE_PER_DOUBLING)
    slow = _falling(trained.images, SLOW_GUIDANCE_AT, SLOW_PER_DOUBLING)
    k = KNOWLEDGE_FULL if trained.knowledge is None else trained.knowledge
    early_share = _share(k, KNOWLEDGE_SLOW, KNOWLEDGE_FULL)
    if trained.gain is not None:
        early_share = max(early_share, _share(trained.gain, GAIN_SLOW, GAIN_FULL))
    return round((early_share * early + (1 - early_share) * slow) * 20) / 20


def _share(x: float, low: float, high: float) -> float:
    """0 up to `low`, 1 from `high`, linear between."""
    return min(1.0, max(0.0, (x - low) / (high - low)))


def _falling(images: int, at: tuple[int, float], per_doubling: float) -> float:
    """w at `at`, falling `per_doubling` for each doubling of the images past it, within
    [GUIDANCE_FLOOR, GUIDANCE_CEILING]."""
    w = at[1] - per_doubling * math.log2(images / at[0])
    return min(GUIDANCE_CEILING, max(GUIDANCE_FLOOR, w))


# The defaults of `diffcli edit` (edit.py), here so that the command line reads them without torch.
# SDEdit's strength (Meng et al. 2022): the share of the sampler's steps that run again, from the
# input noised that far. 0.6 leaves the layout and lets the label redraw the strokes.
EDIT_STRENGTH = 0.6
# Guidance for a change of class (image-to-image and inversion; inpainting keeps the sampling
# default, its kept region anchors the label). From part-way noise the input still holds the
# old class, and the weight that draws a clean sample is too weak to move it: on MNIST 3 -> 8
# at strength 0.6 (DDIM 50), w = 2 made 39% 8s, 4 made 67%, 8 made 91% with 95% of the edits
# still closer to their own input than to any other (docs/editing.md). Stable Diffusion's
# img2img default, 7.5, is of the same size. On a 3-minute shapes model it neither helped nor
# hurt (circle -> square 16% at w = 2, 18% at 8; the model barely draws squares yet): to be
# checked again on a better-trained second dataset.
EDIT_GUIDANCE = 8.0
# RePaint's tries of every step. On MNIST with the lower half redrawn (DDIM 50) the true label
# came back 99% of the time with 1, 100% with 3 and 5, but by eye only 5 joined the halves
# of every stroke (docs/editing.md); the paper uses 10. Cost grows with it: 18, 49, 88 s for
# 100 digits on 2 CPU cores.
JUMPS = 5


@dataclass(frozen=True)
class Student:
    """What a distilled model (`diffcli distill`) was made for: DDIM on its `steps`
    trailing timesteps, one conditional pass each, with the teacher's `guidance` built in."""
    steps: int
    guidance: float


@dataclass(frozen=True)
class SamplerSpec:
    sampler: str = "ddim"
    steps: int | None = bounded(None, AT_LEAST_ONE)  # None: DEFAULT_STEPS[sampler], or T for ddpm
    guidance: float | None = bounded(None, NON_NEGATIVE)  # None: default_guidance(the model's training); 1 = plain conditional, 0 = unconditional
    eta: float = bounded(0.0, NON_NEGATIVE)  # DDIM's noise: 0 deterministic, 1 DDPM-like
    variance: str = "beta_tilde"
    clip: bool = True  # clip x̂0 to the data range at every step
    spacing: str = "trailing"
    interval: tuple[float, float] | None = None  # guide only where low < σ_t <= high (guidance.interval); None: at every step
    shift: float = bounded(1.0, POSITIVE)  # SD3's time shift of the steps (samplers.shifted); 1: none

    def __post_init__(self):
        """What needs no model is refused at once, before any file is read."""
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler '{self.sampler}'; choose one of {', '.join(SAMPLERS)}.")
        if self.variance not in VARIANCES:
            raise UserError(f"--variance must be one of {', '.join(VARIANCES)}, got '{self.variance}'.")
        if self.spacing not in SPACINGS:
            raise UserError(f"--spacing must be one of {', '.join(SPACINGS)}, got '{self.spacing}'.")
        if self.sampler == "ddpm" and (self.spacing != "trailing" or self.shift != 1):
            raise UserError("ddpm runs all T steps, so there is no spacing to choose; drop --spacing and --shift.")
        if self.eta > 0 and self.sampler != "ddim":  # (each was ignored without a word, but euler's)
            raise UserError(f"--eta is DDIM's noise, which {self.sampler} does not take; use --sampler ddim with --eta.")
        if self.variance != VARIANCES[0] and self.sampler != "ddpm":
            raise UserError(f"--variance sets DDPM's step noise, which {self.sampler} does not take; use --sampler ddpm with it.")
        check_fields(self, lambda name: f"--{name}", skip=("steps",))  # steps: by `resolve`, which knows T
        if self.interval is not None:
            low, high = self.interval
            if not (math.isfinite(low) and 0 <= low < high):
                raise UserError(f"--guidance-interval must be two noise levels 0 <= LOW < HIGH (HIGH may be inf), got {low:g},{high:g}.")

    def resolve(self, T: int, student: Student | None = None, trained: Trained | None = None) -> SamplerSpec:
        """This spec with every default filled in for a model of T diffusion steps that has
        the training `trained` (a distilled `student`: the sampler it was made for),
        or a UserError naming the option that cannot be served. Resolving twice changes nothing."""
        if student is not None:
            return self._for_student(T, student)
        if self.steps is not None and not 1 <= self.steps <= T:
            raise UserError(f"--steps must be between 1 and T={T}, got {self.steps}.")
        if self.sampler == "ddpm" and self.steps not in (None, T):
            raise UserError(f"ddpm runs all T={T} steps; for fewer steps use --sampler ddim.")
        steps = T if self.sampler == "ddpm" else (self.steps or DEFAULT_STEPS[self.sampler])
        guidance = default_guidance(trained) if self.guidance is None else float(self.guidance)
        return dataclasses.replace(self, steps=steps, guidance=guidance)

    def _for_student(self, T: int, student: Student) -> SamplerSpec:
        made = f"this model was distilled for ddim with {student.steps} steps"
        if self.sampler not in DDIM_SAMPLERS:
            raise UserError(f"{made}; --sampler {self.sampler} cannot run it (drop --sampler).")
        if self.steps not in (None, student.steps):
            raise UserError(f"{made}; its steps are not an approximation that more or fewer of them refine, "
                            f"so --steps {self.steps} cannot serve it (drop --steps, or distil again with --steps {self.steps}).")
        if self.guidance not in (None, 1.0):
            raise UserError(f"{made} and the teacher's guidance {student.guidance:g} built in; drop --guidance.")
        if self.eta > 0 or self.spacing != "trailing" or self.shift != 1:
            raise UserError(f"{made} on trailing timesteps without noise; drop --eta, --spacing and --shift.")
        if self.interval is not None:
            raise UserError(f"{made} and the teacher's guidance {student.guidance:g} built in; drop --guidance-interval.")
        return dataclasses.replace(self, steps=student.steps, guidance=1.0)

    def describe(self, student: Student | None = None) -> str:
        """As a command's line says it; a distilled `student` runs with its teacher's weight built in."""
        steps = "default steps" if self.steps is None else f"{self.steps} steps"
        guidance = (f"{student.guidance:g} built in" if student else "auto" if self.guidance is None else f"{self.guidance:g}")
        shift = "" if self.shift == 1 else f", shift {self.shift:g}"
        return f"{self.sampler} {steps}{shift}, guidance {guidance}{interval_text(self.interval)}"


def interval_text(interval: tuple[float, float] | None) -> str:
    """' for σ in (0.28, 5.42]' after a guidance weight, or '' when it guides every step."""
    return "" if interval is None else f" for σ in ({interval[0]:g}, {interval[1]:g}]"

