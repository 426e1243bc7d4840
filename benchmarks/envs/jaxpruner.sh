#!/usr/bin/env bash
# JaxPruner (google-research/jaxpruner) as the side-by-side comparator of benchmarks/prune_step.py.
#
# JaxPruner is not on PyPI, and its published source targets older jax: it calls jax.tree_map,
# which jax 0.10 removed. This script builds a separate environment for it, leaving the system
# environment (and jax itself) untouched:
#
#   1. a venv with --system-site-packages (it sees the installed jax, optax, flax, chex,
#      ml_collections; nothing else is installed into it);
#   2. the source, unpacked from a local git directory, a source folder or a tarball, or cloned
#      from GitHub when none is given;
#   3. a documented source port to jax 0.10 (below), applied with sed and checked;
#   4. `pip install --no-deps --no-build-isolation` of the ported source into the venv (plus
#      `wheel`, which its setup.py needs, from PyPI when the system site lacks it);
#   5. PORT.txt in the venv saying which commit was ported and how (the benchmark records it).
#
# Usage:
#   benchmarks/envs/jaxpruner.sh [VENV_DIR]
#   JAXPRUNER_SRC=/path/to/bare.git|/path/to/src|/path/to/src.tar.gz benchmarks/envs/jaxpruner.sh
# then
#   VENV_DIR/bin/python benchmarks/prune_step.py
#
# VENV_DIR defaults to $JAXPRUNER_VENV, else /work/venvs/jaxpruner. JAXPRUNER_REF picks the
# commit of a git source (default HEAD).
#
# The port (jax 0.10 removed the jax.tree_* aliases of jax.tree_util; jax.tree.* replaces them):
#   jax.tree_map        -> jax.tree.map
#   jax.tree_leaves     -> jax.tree.leaves
#   jax.tree_flatten    -> jax.tree.flatten
#   jax.tree_unflatten  -> jax.tree.unflatten
#   jax.tree_structure  -> jax.tree.structure
# Only whole-word calls of these aliases are rewritten (jax.tree_util.* is left as it is). The
# script fails if any removed alias is left afterwards, so a new upstream use is not missed.
set -euo pipefail

VENV_DIR="${1:-${JAXPRUNER_VENV:-/work/venvs/jaxpruner}}"
SRC="${JAXPRUNER_SRC:-}"
REF="${JAXPRUNER_REF:-HEAD}"
PYTHON="${PYTHON:-python3}"
REMOVED_ALIASES="tree_map tree_leaves tree_flatten tree_unflatten tree_structure"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
src_dir="$work/jaxpruner"
mkdir -p "$src_dir"

# ---- 1. the source --------------------------------------------------------------------------
commit="unknown"
if [[ -z "$SRC" ]]; then
  echo "JAXPRUNER_SRC not set: cloning https://github.com/google-research/jaxpruner" >&2
  git clone --quiet https://github.com/google-research/jaxpruner "$work/clone"
  SRC="$work/clone/.git"
fi
if [[ -d "$SRC" ]] && git --git-dir="$SRC" rev-parse --verify --quiet "$REF^{commit}" >/dev/null 2>&1; then
  commit="$(git --git-dir="$SRC" rev-parse "$REF^{commit}")"
  git --git-dir="$SRC" archive "$commit" | tar -x -C "$src_dir"
elif [[ -d "$SRC/.git" ]]; then
  commit="$(git --git-dir="$SRC/.git" rev-parse "$REF^{commit}")"
  git --git-dir="$SRC/.git" archive "$commit" | tar -x -C "$src_dir"
elif [[ -d "$SRC" ]]; then
  cp -R "$SRC"/. "$src_dir"
elif [[ -f "$SRC" ]]; then
  tar -xf "$SRC" -C "$src_dir" --strip-components="${JAXPRUNER_STRIP:-1}"
else
  echo "JAXPRUNER_SRC=$SRC is neither a git directory, a source folder nor a tarball" >&2
  exit 2
fi
if [[ ! -f "$src_dir/setup.py" || ! -d "$src_dir/jaxpruner" ]]; then
  echo "$SRC does not hold the jaxpruner source (no setup.py and jaxpruner/ at its top)" >&2
  exit 2
fi

# ---- 2. the port ----------------------------------------------------------------------------
mapfile -t files < <(grep -rlE --include='*.py' 'jax\.tree_(map|leaves|flatten|unflatten|structure)\b' "$src_dir" || true)
for alias in $REMOVED_ALIASES; do
  new="${alias#tree_}"
  for f in "${files[@]}"; do
    sed -i -E "s/\bjax\.${alias}\b/jax.tree.${new}/g" "$f"
  done
done
if grep -rnE --include='*.py' 'jax\.tree_(map|leaves|flatten|unflatten|structure)\b' "$src_dir"; then
  echo "removed jax aliases are left after the port (above)" >&2
  exit 3
fi

# ---- 3. the venv and the install ------------------------------------------------------------
"$PYTHON" -m venv --system-site-packages "$VENV_DIR"
# setup.py needs `wheel` to build; without build isolation it must be in the venv (from PyPI
# when the system site has none).
"$VENV_DIR/bin/python" -c "import wheel" 2>/dev/null || "$VENV_DIR/bin/python" -m pip install --quiet wheel
"$VENV_DIR/bin/python" -m pip install --quiet --force-reinstall --no-deps --no-build-isolation "$src_dir"
cat > "$VENV_DIR/PORT.txt" <<PORT
source: google-research/jaxpruner commit $commit (from $SRC)
port to jax 0.10: ${#files[@]} files rewritten: jax.tree_map/tree_leaves/tree_flatten/tree_unflatten/tree_structure -> jax.tree.map/leaves/flatten/unflatten/structure (jax 0.10 removed the aliases); nothing else changed
installed: pip install --no-deps --no-build-isolation into a venv with --system-site-packages
PORT
"$VENV_DIR/bin/python" - <<'PY'
import jax, jax.numpy as jnp, jaxpruner
pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=lambda p: jax.tree.map(lambda _: 0.5, p))
opt = pruner.wrap_optax(__import__("optax").sgd(0.1))
jax.eval_shape(opt.init, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)})
print("jaxpruner", getattr(jaxpruner, "__version__", "(no version)"), "runs on jax", jax.__version__)
PY
echo "installed into $VENV_DIR (see $VENV_DIR/PORT.txt); run: $VENV_DIR/bin/python benchmarks/prune_step.py"
