# Sourced by the device scripts (gpu_check.sh, gpu_study.sh, gpu_profile.sh), from the
# repository root. The device machine has no network: where megatron-core is not installed,
# its cp312 wheel, carried in $WHEELS (see gpu_study.sh's header), goes into /tmp/site.
# Whether it is installed is a lookup, not an import (about 11 s on two CPU cores): a broken
# install fails at the first run with its own traceback.
ensure_megatron_core() {
  if "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.core') is None)" \
    2>/dev/null; then
    return 0
  fi
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "megatron-core is not installed and no wheel is in $WHEELS (see bench/gpu_study.sh's" \
      "header)" >&2
    return 1
  fi
  echo "== installing the carried wheels from $WHEELS"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || return 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
