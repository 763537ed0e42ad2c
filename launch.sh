#!/usr/bin/env bash
# launch.sh: run `python -m ringlet COMMAND ...` as one process, or as N MPI ranks (mpirun, or srun under SLURM).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: ./launch.sh [-n N] [--mpi-args "ARGS"] [--module M] COMMAND [ARGS...]

Runs `python -m ringlet COMMAND ARGS...`, e.g. `./launch.sh -n 8 serve`:
  in a SLURM allocation  srun --mpi=PLUGIN --kill-on-bad-exit=1 [-n N] python -m ringlet ...
                         (no -n: the allocation's task count; one line on stderr says which plugin and why)
  N > 1 elsewhere        mpirun -n N python -m ringlet ...  (Open MPI or MPICH; as root and oversubscribed too)
  N = 1 (the default)    python -m ringlet ...

options (before COMMAND):
  -n N               number of ranks, a positive integer
  --mpi-args "ARGS"  extra arguments for mpirun or srun, split on whitespace (also runs mpirun when N = 1)
  --module M         run `python -m M ARGS...` instead; `--module ringlet.mpi` prints where each rank landed
  -h, --help         this text

environment:
  PYTHON             the python every rank runs (default: python3 on PATH)
  RINGLET_MPIRUN     the mpirun to use (default: mpirun on PATH)
  RINGLET_SRUN_MPI   srun's --mpi plugin (default: pmix for Open MPI, pmi2 for MPICH, as `srun --mpi=list` offers)
EOF
}

die() {
    echo "launch.sh: $*" >&2
    exit 2
}

n=""
n_given=0
mpi_args=""
module=ringlet
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        -n) (($# >= 2)) || die "-n needs a positive integer"; n=$2; n_given=1; shift 2 ;;
        -n*) n=${1#-n}; n=${n#=}; n_given=1; shift ;;
        --mpi-args) (($# >= 2)) || die "--mpi-args needs a value"; mpi_args+=" $2"; shift 2 ;;
        --mpi-args=*) mpi_args+=" ${1#*=}"; shift ;;
        --module) (($# >= 2)) || die "--module needs a module name"; module=$2; shift 2 ;;
        --module=*) module=${1#*=}; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1' before COMMAND (see ./launch.sh --help)" ;;
        *) break ;;
    esac
done
if ((n_given)) && [[ ! $n =~ ^[1-9][0-9]*$ ]]; then
    die "-n needs a positive integer, got '$n'"
fi
if [[ $module == ringlet && $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
read -r -a extra <<<"$mpi_args"

py=$(command -v -- "${PYTHON:-python3}") ||
    die "python not found: '${PYTHON:-python3}' (set PYTHON to the python that has ringlet installed)"
export PYTHON=$py
cmd=("$py" -m "$module" "$@")

# The MPI family of a version text: `mpirun --version`, or the library line that mpi4py loads.
family() {
    case ${1,,} in
        *"open mpi"* | *openrte*) echo openmpi ;;
        *hydra* | *mpich*) echo mpich ;; # MPICH's own hydra mpiexec and libmpi
        *) echo other ;;                 # Intel MPI, MVAPICH, ...: left to their defaults
    esac
}

# First line of the MPI library version that mpi4py loads in $py, without initialising MPI.
mpi_library() {
    "$py" -c 'import mpi4py
mpi4py.rc.initialize = mpi4py.rc.finalize = False
from mpi4py import MPI
print(" ".join(MPI.Get_library_version().replace("\0", "").splitlines()[0].split()))'
}

# --- SLURM: an allocation (sbatch script or salloc shell), not yet inside an srun step ---------------------------
if [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} ]]; then
    command -v srun >/dev/null || die "SLURM_JOB_ID is set but srun is not on PATH"
    plugin=${RINGLET_SRUN_MPI:-}
    why="from RINGLET_SRUN_MPI"
    if [[ -z $plugin ]]; then
        # Old srun writes "srun: pmi2" lines to stderr, newer ones an indented list to stdout; the plugins are the
        # lines of one word.
        offered=$(timeout 60 srun --mpi=list 2>&1 | sed -E 's/^srun: *//; s/^[[:space:]]+//; s/[[:space:]]+$//' |
            grep -xE '[[:alnum:]_.-]+') || true
        lib=$(family "$(mpi_library 2>/dev/null || true)")
        # Open MPI 5 speaks only PMIx. MPICH speaks PMI-2, which every Slurm offers, while a listed pmix can still
        # fail to load (Debian 12 lists it but lacks the unversioned libpmix.so it dlopens).
        if [[ $lib == openmpi ]] && grep -qx pmix <<<"$offered"; then
            plugin=pmix
        elif grep -qx pmi2 <<<"$offered"; then
            plugin=pmi2
        elif grep -qx pmix <<<"$offered"; then
            plugin=pmix
        else
            plugin=pmi2
        fi
        why="srun offers: ${offered//$'\n'/ }; mpi4py's MPI: $lib"
    fi
    # Slurm 22.05 and later no longer pass the job's --cpus-per-task on to srun; without this every rank would be
    # given one CPU.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${SRUN_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    echo "launch.sh: srun --mpi=$plugin ($why)" >&2
    # Without --kill-on-bad-exit srun waits for the other ranks of a rank that died, which wait for it in turn.
    exec srun --mpi="$plugin" --kill-on-bad-exit=1 ${n:+-n "$n"} "${extra[@]}" "${cmd[@]}"
fi

# --- inside an srun step: each task is already a rank ---------------------------------------------------------------
if [[ -n ${SLURM_STEP_ID:-} ]]; then
    if [[ -n $n && $n -gt 1 ]]; then
        die "already inside srun step ${SLURM_JOB_ID:-?}.${SLURM_STEP_ID}: srun started the ranks; call launch.sh -n $n from the batch script or salloc shell, not under srun"
    fi
    exec "${cmd[@]}"
fi

# --- one process ----------------------------------------------------------------------------------------------------
if [[ ${n:-1} -eq 1 && ${#extra[@]} -eq 0 ]]; then
    exec "${cmd[@]}"
fi

# --- mpirun ---------------------------------------------------------------------------------------------------------
mpirun=${RINGLET_MPIRUN:-mpirun}
mpirun_path=$(command -v -- "$mpirun") ||
    die "'$mpirun' not found on PATH, needed for -n ${n:-1}: pip install mpich, or load your cluster's MPI module"
impl=$(family "$("$mpirun_path" --version 2>&1 || true)")

lib_line=$(mpi_library 2>&1) ||
    die "$py cannot load mpi4py's MPI library ($(tail -n 1 <<<"$lib_line")): pip install mpi4py mpich, or load your cluster's MPI module"
lib=$(family "$lib_line")
if [[ $impl != other && $lib != other && $lib != "$impl" ]]; then
    # mpi4py would load another MPI than this mpirun's, and every rank would come up alone (or abort). Point
    # mpi4py at the libmpi beside this mpirun (or by soname), unless the user already chose one.
    [[ -z ${MPI4PY_LIBMPI:-} ]] ||
        die "mpirun is $impl ($mpirun_path) but MPI4PY_LIBMPI=$MPI4PY_LIBMPI loads '$lib_line'"
    prefix=$(dirname "$(dirname "$(readlink -f "$mpirun_path")")")
    soname=libmpi.so.12
    [[ $impl == openmpi ]] && soname=libmpi.so.40
    export MPI4PY_LIBMPI="$prefix/lib:$prefix/lib64:$soname"
    fixed=$(mpi_library 2>/dev/null || true)
    [[ $(family "$fixed") == "$impl" ]] ||
        die "mpirun is $impl ($mpirun_path) but mpi4py loads '$lib_line': put that MPI's mpirun first on PATH (or set RINGLET_MPIRUN), or set MPI4PY_LIBMPI to the libmpi of $mpirun_path"
    echo "launch.sh: mpirun is $impl but mpi4py would load '$lib_line'; using MPI4PY_LIBMPI=$MPI4PY_LIBMPI" >&2
fi

args=(-n "${n:-1}")
case $impl in
    openmpi)
        # Open MPI (4.x and 5.x alike) refuses to run as root without --allow-run-as-root (the two variables do the
        # same and reach nested launches), refuses more ranks than cores unless oversubscribed, and binds each rank
        # to a core by default.
        if ((EUID == 0)); then
            args+=(--allow-run-as-root)
            export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        fi
        # Open MPI 4 insists on an ssh or rsh binary even for ranks on this host; without either (containers), name
        # one that is never run, unless the site chose a launcher (e.g. OMPI_MCA_plm=isolated).
        if ! command -v ssh >/dev/null && ! command -v rsh >/dev/null &&
            [[ -z ${OMPI_MCA_plm:-}${OMPI_MCA_plm_rsh_agent:-}${OMPI_MCA_orte_rsh_agent:-}${PRTE_MCA_plm_ssh_agent:-} ]]; then
            export OMPI_MCA_plm_rsh_agent=false
        fi
        args+=(--oversubscribe --bind-to none -x PYTHON)
        [[ -n ${MPI4PY_LIBMPI:-} ]] && args+=(-x MPI4PY_LIBMPI)
        ;;
    mpich)
        # Hydra runs as root as it is, oversubscribes without asking, forwards the whole environment, and starts
        # local ranks by fork (no ssh needed); only binding is turned off, so ranks keep every core for torch.
        args+=(-bind-to none)
        ;;
esac
if [[ $impl != mpich ]]; then
    exec "$mpirun_path" "${args[@]}" "${extra[@]}" "${cmd[@]}"
fi
# Hydra reports a failed job by one PID (on stdout: "PID 1234 RUNNING AT node1 / EXIT CODE: 9"), not always the
# rank that failed first: it kills the others at once and names whichever it collects first. So every rank of a
# ringlet command runs under ringlet.mpi.rank_guard, its parent, which appends "PID signal N" or "PID exit N" to
# RINGLET_DEATHS when its rank fails; ringlet's rank 0 writes "PID HOST RANK PPID" lines to RINGLET_RANK_MAP at
# start-up. This filter passes both streams through unchanged and, after hydra's report, adds one line on stderr
# naming the first rank in
# RINGLET_DEATHS (else the rank whose pid or guard's pid hydra gave). The filters read mpirun's streams from two
# FIFOs as background jobs, so that (a) launch.sh exits only after both have written everything (a caller that
# reads a log file when launch.sh ends finds it complete), and (b) Ctrl-C does not reach them (a non-interactive
# shell starts background jobs with SIGINT ignored): mpirun forwards it to the ranks and the filters pass on what
# the ranks print until the end.
work=$(mktemp -d "${TMPDIR:-/tmp}/ringlet-launch.XXXXXX")
trap 'rm -rf "$work"' EXIT
export RINGLET_RANK_MAP=$work/ranks RINGLET_DEATHS=$work/deaths
: >"$RINGLET_RANK_MAP"
mkfifo "$work/out" "$work/err"
# ringlet's commands write the rank map; other modules (--module) run as they are.
if [[ $module == ringlet ]]; then
    cmd=("$py" -m ringlet.mpi.rank_guard "$RINGLET_DEATHS" -- "${cmd[@]}")
fi
name_rank='
    function ended(status, code) {
        if (status == "exit") return "exited with code " code
        if (code == 9) return "was killed (SIGKILL)"
        return "was killed by signal " code (code in signame ? " (" signame[code] ")" : "")
    }
    BEGIN { split("HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM", s, " ")
            for (i in s) signame[i] = "SIG" s[i] }
    { print; fflush() }
    /^=+ +PID [0-9]+ RUNNING AT / { pid = $3 }
    /^=+ +EXIT CODE: / && pid != "" {
        dead = ""; status = "exit"; code = $4
        if ((getline line < deaths) > 0) { split(line, d, " "); dead = d[1]; status = d[2]; code = d[3] }
        close(deaths)
        rank = ""
        while ((getline line < map) > 0) {
            split(line, f, " ")
            if (dead != "" ? (f[1] == dead) : (f[1] == pid || f[4] == pid)) { rank = f[3]; host = f[2]; who = f[1] }
        }
        close(map)
        if (dead == "" && (code == 9 || code == 137)) { status = "signal"; code = 9 }  # hydra: 128 + SIGKILL too
        if (rank != "") {
            print "ringlet: rank " rank " (pid " who " on " host ") " ended(status, code) "; mpirun ended the other ranks" \
                > "/dev/stderr"
            fflush("/dev/stderr")
        }
        pid = ""
    }'
# mawk (Debian's default awk) reads a pipe in 4 KiB blocks unless told to go line by line.
awk_flags=()
awk -W version 2>&1 | grep -qi mawk && awk_flags=(-W interactive)
awk "${awk_flags[@]}" -v map="$RINGLET_RANK_MAP" -v deaths="$RINGLET_DEATHS" "$name_rank" <"$work/out" &
out_filter=$!
awk "${awk_flags[@]}" -v map="$RINGLET_RANK_MAP" -v deaths="$RINGLET_DEATHS" "$name_rank" <"$work/err" >&2 &
err_filter=$!
set +e
"$mpirun_path" "${args[@]}" "${extra[@]}" "${cmd[@]}" >"$work/out" 2>"$work/err"
rc=$?
wait "$out_filter" "$err_filter"
exit $rc
