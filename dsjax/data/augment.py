"""On-device image augmentation: random crop of the zero-padded image and horizontal flip.

The standard CIFAR augmentation (He et al., 2016): pad each side by 4 pixels, crop a
random window of the original size, and mirror left-right with probability 1/2. Pure
`jax.numpy`, with static shapes, so it runs inside the jitted train step; the result
depends only on the rng key and the images.

The random draws and their application are separate functions, `sample_crop_flip` and
`apply_crop_flip`, so callers (and tests) can see or choose the crop offsets and flips;
`random_crop_flip` is the two together.

Padding is with zeros in whatever space the images are in: for the per-channel
normalised images of `dsjax.data.cifar10`, that is the dataset's mean colour rather than
black.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(images: jax.Array, padding: int) -> None:
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC [batch, height, width, channels], got shape "
                     f"{images.shape}")
  if not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding!r}")


def sample_crop_flip(rng: jax.Array, num_images: int, *,
                     padding: int = 4) -> tuple[jax.Array, jax.Array]:
  """Draws the per-example crop offsets and flip decisions.

  Args:
    rng: a PRNG key.
    num_images: the batch size.
    padding: pixels of zero padding on each side.

  Returns:
    `(offsets, flips)`: int32 [num_images, 2] (row, column) corners of the crop in the
    padded image, each uniform on 0..2*padding inclusive; and bool [num_images], True
    (probability 1/2) where the crop is mirrored left-right.
  """
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (num_images, 2), 0, 2 * padding + 1, jnp.int32)
  flips = jax.random.bernoulli(flip_rng, 0.5, (num_images,))
  return offsets, flips


def apply_crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *,
                    padding: int = 4) -> jax.Array:
  """Crops each zero-padded image at its offset and mirrors the flipped ones.

  Args:
    images: [batch, height, width, channels].
    offsets: int [batch, 2] (row, column) crop corners in the padded image, in
      0..2*padding (larger ones are clamped by `lax.dynamic_slice`).
    flips: bool [batch]; True mirrors that example's crop left-right.
    padding: pixels of zero padding on each side.

  Returns:
    The augmented images, same shape and dtype.
  """
  _check(images, padding)
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    start = (offset[0], offset[1], jnp.zeros((), offset.dtype))
    return jax.lax.dynamic_slice(image, start, (height, width, channels))

  cropped = jax.vmap(crop)(padded, offsets)
  return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def random_crop_flip(rng: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
  """Randomly crops each zero-padded image back to its size and mirrors half of them.

  Args:
    rng: a PRNG key; the same key and images give the same result.
    images: [batch, height, width, channels].
    padding: pixels of zero padding on each side; 0 leaves only the flips.

  Returns:
    The augmented images, same shape and dtype. Equal to
    `apply_crop_flip(images, *sample_crop_flip(rng, len(images), padding=padding))`.
  """
  _check(images, padding)
  offsets, flips = sample_crop_flip(rng, images.shape[0], padding=padding)
  return apply_crop_flip(images, offsets, flips, padding=padding)
