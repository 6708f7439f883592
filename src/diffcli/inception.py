"""Inception-v3 FID (Heusel et al. 2017) through torch-fidelity's feature extractor.

torch-fidelity's InceptionV3 is a port of the TensorFlow graph the original FID
used (including TF's bilinear resize to 299×299), so numbers match pytorch-fid,
torchmetrics and the papers. Its weights file (weights-inception-2015-12-05-6726825d.pth)
is looked for in torch's hub cache, where torch-fidelity and torchmetrics keep
it, or given with --inception-weights; pytorch-fid's pt_inception-2015-12-05-6726825d.pth
holds the same network and works too. It is read with torch.load(weights_only=True),
which refuses anything but tensors, so no file is ever unpickled as code.

Real-image statistics (mean and covariance of the 2048 pool features) are cached
per dataset, split, image size and weights file, under ~/.cache/diffcli/fid-stats.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffcli import metrics
from diffcli.errors import UserError
from diffcli.files import sha256

WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
CACHE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FEATURES = "2048"  # the pool3 features of the original FID


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(path: str | Path | None) -> Path | None:
    """The weights file to use: `path` if given, else one in the hub cache, else None."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights '{path}' does not exist.")
        return path
    return next((hub_dir() / name for name in CACHE_NAMES if (hub_dir() / name).is_file()), None)


def download_weights() -> Path:
    """Fetch the weights into the hub cache; offline, one sentence on where to put them."""
    import socket

    target = hub_dir() / CACHE_NAMES[0]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(target), progress=False)
    except Exception as e:  # URLError, HTTPError, OSError, timeouts
        raise UserError(f"FID needs the Inception-v3 weights, which are not in '{hub_dir()}' and could not be downloaded "
                        f"({type(e).__name__}); download {WEIGHTS_URL} into that folder, or pass --inception-weights PATH.") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return target


def load_inception(weights: str | Path | None = None, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """(feature extractor in eval mode, short hash of its weights file) — the hash keys the stats cache."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as fe
    except ImportError:
        raise UserError("FID needs torch-fidelity; install it with: pip install 'diffcli[fid]'.") from None
    path = find_weights(weights) or download_weights()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"'{path}' is not an Inception-v3 weights file torch can read safely ({type(e).__name__}).") from None
    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *args, **kwargs: state  # hand it the tensors read above, never a path to unpickle
    try:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES])
    except RuntimeError as e:  # load_state_dict: missing or mis-shaped keys
        raise UserError(f"'{path}' does not hold the FID Inception-v3 weights: {str(e).splitlines()[0]}") from None
    finally:
        fe.load_state_dict_from_url = original
    return net.to(device), sha256(path)[:12]


@torch.no_grad()
def features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """(N, 2048) float32 pool features of uint8 images; grayscale is repeated to RGB, as usual."""
    device = next(net.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        if chunk.shape[1] == 1:
            chunk = chunk.expand(-1, 3, -1, -1)
        out.append(net(chunk.to(device))[0].float().cpu())
    return torch.cat(out)


def stats_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "diffcli" / "fid-stats"


def real_stats(net: torch.nn.Module, weights_hash: str, key: str, images) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, covariance, came from cache) of the real images named by `key`; `images` is a
    callable giving them, called only when the statistics are not cached yet."""
    from safetensors.torch import load_file

    from diffcli.checkpoint import save_tensors

    path = stats_cache() / f"{_safe(key)}-{weights_hash}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            return t["mu"], t["cov"], True
        except Exception:
            pass  # a damaged cache entry is recomputed and replaced
    mu, cov = metrics.mean_cov(features(net, images()))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"mu": mu, "cov": cov}, {"key": key})
    return mu, cov, False


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[-120:]


def fid(net: torch.nn.Module, generated: torch.Tensor, real_mu: torch.Tensor, real_cov: torch.Tensor) -> float:
    return metrics.frechet_distance(*metrics.mean_cov(features(net, generated)), real_mu, real_cov)
