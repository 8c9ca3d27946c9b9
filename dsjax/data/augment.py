"""On-device image augmentation: random crop and flip (classification), random flip and
zoom with the boxes (detection).

The standard CIFAR augmentation (He et al., 2016): pad each side by 4 pixels, crop a
random window of the original size, and mirror left-right with probability 1/2. Pure
`jax.numpy`, with static shapes, so it runs inside the jitted train step; the result
depends only on the rng key and the images.

The random draws and their application are separate functions, `sample_crop_flip` and
`apply_crop_flip`, so callers (and tests) can see or choose the crop offsets and flips;
`random_crop_flip` is the two together.

Detection batches get `random_flip_scale`: a left-right mirror with probability 1/2 and a
zoom in [0.75, 1.25] with a random shift, the boxes moved the same way and those mostly
out of the frame dropped (`sample_flip_scale` / `apply_flip_scale`).

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


def sample_flip_scale(rng: jax.Array, num_images: int, height: int, width: int, *,
                      scale_range: tuple[float, float] = (0.75, 1.25)
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws the per-example flips, zooms and shifts of `apply_flip_scale` (detection).

  Args:
    rng: a PRNG key.
    num_images: the batch size.
    height: image height in pixels.
    width: image width in pixels.
    scale_range: (min, max) of the uniform zoom factor.

  Returns:
    `(flips, scales, shifts)`: bool [num_images]; float32 [num_images] zooms; float32
    [num_images, 2] (x, y) translations in pixels, uniform between 0 and (1 - scale) x
    the image side, so a shrunk image stays inside the frame and an enlarged one covers it.
  """
  flip_rng, scale_rng, shift_rng = jax.random.split(rng, 3)
  flips = jax.random.bernoulli(flip_rng, 0.5, (num_images,))
  scales = jax.random.uniform(scale_rng, (num_images,), jnp.float32, *scale_range)
  sides = jnp.asarray([width, height], jnp.float32)
  shifts = jax.random.uniform(shift_rng, (num_images, 2)) * (1.0 - scales)[:, None] * sides
  return flips, scales, shifts


def apply_flip_scale(images: jax.Array, boxes: jax.Array, classes: jax.Array,
                     flips: jax.Array, scales: jax.Array, shifts: jax.Array, *,
                     min_visible: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mirrors, zooms and shifts each image and its boxes the same way.

  A point x of the (mirrored) image goes to `x * scale + shift` in continuous pixel
  coordinates (`jax.image.scale_and_translate`'s convention); uncovered pixels are 0.
  Boxes are clipped to the frame, and a box that keeps less than `min_visible` of its
  area, or less than a pixel of width or height, becomes padding (class -1, zeros).

  Args:
    images: float [batch, height, width, channels].
    boxes: [batch, M, 4] (x0, y0, x1, y1) in pixels.
    classes: int [batch, M]; -1 marks padding.
    flips: bool [batch]: mirror left-right first.
    scales: [batch] zoom factors.
    shifts: [batch, 2] (x, y) translations in pixels.
    min_visible: the share of a box's area that must stay in the frame.

  Returns:
    `(images, boxes, classes)`, same shapes and dtypes.
  """
  _check(images, 0)
  _, height, width, _ = images.shape
  images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
  flip = flips[:, None]
  x0 = jnp.where(flip, width - boxes[..., 2], boxes[..., 0])
  x1 = jnp.where(flip, width - boxes[..., 0], boxes[..., 2])
  boxes = jnp.stack([x0, boxes[..., 1], x1, boxes[..., 3]], axis=-1)

  def zoom(image: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    return jax.image.scale_and_translate(
        image, image.shape, (0, 1), jnp.stack([scale, scale]), shift[::-1], method="linear")

  images = jax.vmap(zoom)(images, scales, shifts).astype(images.dtype)
  moved = boxes * scales[:, None, None] + jnp.tile(shifts, 2)[:, None, :]
  limits = jnp.asarray([width, height, width, height], jnp.float32)
  clipped = jnp.clip(moved, 0.0, limits)

  def area(b: jax.Array) -> jax.Array:
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)

  keep = ((classes >= 0) & (area(clipped) >= min_visible * area(moved))
          & (clipped[..., 2] - clipped[..., 0] >= 1.0) & (clipped[..., 3] - clipped[..., 1] >= 1.0))
  return (images, jnp.where(keep[..., None], clipped, 0.0).astype(boxes.dtype),
          jnp.where(keep, classes, -1))


def random_flip_scale(rng: jax.Array, images: jax.Array, boxes: jax.Array, classes: jax.Array,
                      *, scale_range: tuple[float, float] = (0.75, 1.25)
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Detection augmentation: a random mirror, zoom and shift of each image and its boxes
  (`sample_flip_scale` then `apply_flip_scale`)."""
  _, height, width, _ = images.shape
  draws = sample_flip_scale(rng, images.shape[0], height, width, scale_range=scale_range)
  return apply_flip_scale(images, boxes, classes, *draws)
