# Sourced by the GPU session scripts: wheels for packages the GPU machine lacks
# (ml_collections, tensorboardX) are installed from .whl/ when present, and the repo goes
# on PYTHONPATH. Sets PY.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
