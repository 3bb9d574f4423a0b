"""The official release's forward pass in evaluation mode, in numpy float64 on its own layout: the
slow but obviously right reference the converted models are checked against.

It reads the state dict by the release's key names in PyTorch's layouts (conv weights (out, in, kx,
ky, kz) on (C, X, Y, Z) volumes, Linear weights (out, in)), and follows shared/reference/
OFFICIAL-RELEASE.md "Forward details": raw voxel-index locations, latent 0 concatenated to the decoder
input and latent b + 1 conditioning block b (the one latent of a plain encoder conditions every
block), conditional batch norm with one running mean and variance, the latent conv's bias before its
BatchNorm, 7^3 patches l-3..l+3 and 14^3 large patches l-7..l+6 average-pooled by 2, zero outside.
"""

import itertools

import numpy as np

EPS = 1e-5


def pau(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    a = sd[f"{prefix}.weight_numerator"].astype(np.float64)
    b = sd[f"{prefix}.weight_denominator"].astype(np.float64)
    p = sum(a[i] * x**i for i in range(6))
    q = 1.0 + sum(abs(b[j - 1]) * np.abs(x) ** j for j in range(1, 5))
    return p / q


def batch_norm(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    """Evaluation-mode BatchNorm3d of (C, X, Y, Z)."""
    shape = (-1, 1, 1, 1)
    mean = sd[f"{prefix}.running_mean"].reshape(shape)
    var = sd[f"{prefix}.running_var"].reshape(shape)
    w, b = sd[f"{prefix}.weight"].reshape(shape), sd[f"{prefix}.bias"].reshape(shape)
    return (x - mean) / np.sqrt(var + EPS) * w + b


def conv(x: np.ndarray, weight: np.ndarray, bias=None) -> np.ndarray:
    """'same' cross-correlation of (..., I, X, Y, Z) with (O, I, k, k, k), zero padding."""
    k = weight.shape[2]
    p = k // 2
    spatial = x.shape[-3:]
    pad = [(0, 0)] * (x.ndim - 3) + [(p, p)] * 3
    xp = np.pad(x, pad)
    out = np.zeros(x.shape[:-4] + (weight.shape[0],) + spatial)
    for a, b, c in itertools.product(range(k), repeat=3):
        window = xp[..., a : a + spatial[0], b : b + spatial[1], c : c + spatial[2]]
        out += np.einsum("oi,...ixyz->...oxyz", weight[:, :, a, b, c], window)
    if bias is not None:
        out += bias.reshape((-1, 1, 1, 1))
    return out


def mean_pool(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over f^3 cells of (..., X, Y, Z)."""
    *lead, X, Y, Z = x.shape
    return x.reshape(*lead, X // f, f, Y // f, f, Z // f, f).mean(axis=(-5, -3, -1))


def max_pool_to(x: np.ndarray, grid: tuple) -> np.ndarray:
    C, X, Y, Z = x.shape
    gx, gy, gz = grid
    return x.reshape(C, gx, X // gx, gy, Y // gy, gz, Z // gz).max(axis=(2, 4, 6))


def encode(sd: dict, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) full-resolution volume -> latents (K, L) and the segmentation head's
    probabilities (or None)."""
    x = mean_pool(volume, 2)  # trilinear downscaling by 2, align_corners=False
    features = []
    i = 0
    while f"encoder.blocks.{i}.main_mapping.0.weight" in sd:
        p = f"encoder.blocks.{i}"
        h = conv(x, sd[f"{p}.main_mapping.0.weight"])
        h = pau(batch_norm(h, sd, f"{p}.main_mapping.1"), sd, f"{p}.main_mapping.2")
        h = mean_pool(h, 2)
        h = batch_norm(conv(h, sd[f"{p}.main_mapping.5.weight"]), sd, f"{p}.main_mapping.6")
        shortcut = x
        if f"{p}.residual_mapping.weight" in sd:
            shortcut = conv(x, sd[f"{p}.residual_mapping.weight"])
        x = pau(h + mean_pool(shortcut, 2), sd, f"{p}.final_activation")
        features.append(x)
        i += 1
    grid = x.shape[1:]
    if "encoder.output_mappings.0.1.weight" in sd:
        outs = []
        for j, f in enumerate(features):
            p = f"encoder.output_mappings.{j}"
            o = conv(max_pool_to(f, grid), sd[f"{p}.1.weight"])
            outs.append(pau(batch_norm(o, sd, f"{p}.2"), sd, f"{p}.3"))
        z_in = np.concatenate(outs, axis=0)
    else:
        z_in = x
    z = conv(z_in, sd["encoder.final_mapping.0.weight"], sd["encoder.final_mapping.0.bias"])
    z = pau(batch_norm(z, sd, "encoder.final_mapping.1"), sd, "encoder.final_mapping.2")
    seg = None
    if "encoder.segmentation_mapping.0.weight" in sd:
        seg = 1.0 / (1.0 + np.exp(-conv(x, sd["encoder.segmentation_mapping.0.weight"])[0]))
    return z.reshape(z.shape[0], -1), seg


def patches(volume: np.ndarray, locations: np.ndarray, large: bool) -> np.ndarray:
    """(N, C or 2C, 7, 7, 7) patches of a (C, X, Y, Z) volume."""
    small_pad = np.pad(volume, ((0, 0), (3, 3), (3, 3), (3, 3)))
    big_pad = np.pad(volume, ((0, 0), (7, 7), (7, 7), (7, 7)))
    out = []
    for x, y, z in locations:
        p = small_pad[:, x : x + 7, y : y + 7, z : z + 7]
        if large:
            p = np.concatenate([p, mean_pool(big_pad[:, x : x + 14, y : y + 14, z : z + 14], 2)])
        out.append(p)
    return np.stack(out)


def linear(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    out = x @ sd[f"{prefix}.weight"].T
    return out + sd[f"{prefix}.bias"] if f"{prefix}.bias" in sd else out


def logits(state_dict: dict, image: np.ndarray, locations: np.ndarray) -> np.ndarray:
    """(N,) logits for a padded, preprocessed (X, Y, Z, C) grid and (N, 3) voxel indices."""
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
    volume = np.moveaxis(np.asarray(image, np.float64), -1, 0)
    latents, _ = encode(sd, volume)
    parts = [locations.astype(np.float64)]
    if "decoder.patch_mapping.mapping.0.weight" in sd:
        large = sd["decoder.patch_mapping.mapping.0.weight"].shape[1] == 2 * volume.shape[0]
        p = patches(volume, locations, large)
        m = "decoder.patch_mapping.mapping"
        h = pau(conv(p, sd[f"{m}.0.weight"], sd[f"{m}.0.bias"]), sd, f"{m}.1")
        h = pau(conv(h, sd[f"{m}.3.weight"], sd[f"{m}.3.bias"]), sd, f"{m}.4")
        parts.append(h.reshape(len(locations), -1))
    parts.append(np.broadcast_to(latents[0], (len(locations), latents.shape[1])))
    x = np.concatenate(parts, axis=1)
    b = 0
    while f"decoder.blocks.{b}.linear_layer_1.weight" in sd:
        p = f"decoder.blocks.{b}"
        cond = latents[b + 1] if len(latents) > 1 else latents[0]

        def cbn(h: np.ndarray, name: str) -> np.ndarray:
            q = f"{p}.{name}"
            mean = sd[f"{q}.normalization.running_mean"][0]
            var = sd[f"{q}.normalization.running_var"][0]
            gamma, beta = (
                linear(cond, sd, f"{q}.linear_gamma"),
                linear(cond, sd, f"{q}.linear_beta"),
            )
            return (h - mean) / np.sqrt(var + EPS) * gamma + beta

        h = pau(cbn(linear(x, sd, f"{p}.linear_layer_1"), "cnb_1"), sd, f"{p}.activation")
        h = cbn(linear(h, sd, f"{p}.linear_layer_2"), "cnb_2")
        shortcut = (
            linear(x, sd, f"{p}.residual_mapping") if f"{p}.residual_mapping.weight" in sd else x
        )
        x = pau(h + shortcut, sd, f"{p}.final_activation")
        b += 1
    return (x @ sd["decoder.final_mapping.0.weight"].T)[:, 0]


def occupancy(state_dict: dict, image: np.ndarray, locations: np.ndarray) -> np.ndarray:
    """(N,) probabilities: the sigmoid of `logits`."""
    return 1.0 / (1.0 + np.exp(-logits(state_dict, image, locations)))
