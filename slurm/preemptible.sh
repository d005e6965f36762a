# Sourced by the sbatch scripts (submit them from the project root): the environment every
# job shares, and `run_preemptible`, which runs the training so that a stop request ends in a
# checkpoint and, before the time limit, a requeue.
#
#   run_preemptible COMMAND...     run COMMAND (python/accelerate directly, or srun ...) and
#                                  return its exit status
#
# Stop requests and what follows:
#   USR1  SLURM's warning before the time limit (#SBATCH --signal=B:USR1@120), or you:
#         `scancel --signal=USR1 --batch JOBID`. The training checkpoints and stops, then this
#         script runs `scontrol requeue`: the rerun (same job id, same arguments, same
#         output_dir) resumes from the checkpoint (resume: auto) and logs into the same W&B run.
#   TERM  `scancel JOBID`, preemption, the time limit itself. The training checkpoints and
#         stops; nothing is requeued (a user's scancel must stay a cancel; a scheduler that
#         preempts with PreemptMode=REQUEUE requeues by itself). Submitting the same command
#         again resumes.
# train.py exits 75 after such a stop; torchrun and `accelerate launch` with several processes
# report any non-zero worker status as 1, so the requeue is decided on "USR1 seen and the
# training did not finish", not on the number.

: "${PATH:=/usr/local/bin:/usr/bin:/bin}"  # sbatch --export=NONE leaves PATH empty
PY=${PET_PIPELINE_PYTHON:-python}          # the project's environment: activate it before sbatch
export PYTHONUNBUFFERED=1                  # log lines appear in logs/ as they happen
# torchrun (also under `accelerate launch`) forwards these to its workers; USR1 is not in its
# default list, and torchrun would die on it and leave its workers running.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# seconds torchrun gives its workers to checkpoint after forwarding a signal (default 30),
# kept under the 120 s of --signal=B:USR1@120
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on ${SLURM_JOB_NODELIST:-?}, attempt" \
     "$((${SLURM_RESTART_COUNT:-0} + 1)), python: $(command -v "$PY" || echo "$PY not found")"

stop_training() {  # $1: the signal the batch script got
    echo "$(date +%T) SIG$1: asking the training to checkpoint and stop"
    [ "$1" = USR1 ] && REQUEUE_WHEN_STOPPED=1
    if [ "$TRAINING_VIA_SRUN" = 1 ]; then
        # to every task of the job's steps (the launchers on all nodes), not the batch script;
        # a TERM to srun itself would make it kill the step without a grace period
        scancel --signal=TERM "$SLURM_JOB_ID"
    else
        kill -TERM "$TRAINING_PID" 2>/dev/null
    fi
}

run_preemptible() {
    REQUEUE_WHEN_STOPPED=""
    TRAINING_VIA_SRUN=0
    [ "$(basename "$1")" = srun ] && TRAINING_VIA_SRUN=1
    # in the background: bash runs a trap only between commands or while it `wait`s
    "$@" &
    TRAINING_PID=$!
    trap 'stop_training USR1' USR1
    trap 'stop_training TERM' TERM
    local status
    wait "$TRAINING_PID"; status=$?
    while [ "$status" -gt 128 ] && kill -0 "$TRAINING_PID" 2>/dev/null; do  # a trap cut the wait short
        wait "$TRAINING_PID"; status=$?
    done
    trap - USR1 TERM
    if [ -n "$REQUEUE_WHEN_STOPPED" ] && [ "$status" -ne 0 ]; then
        echo "$(date +%T) stopped before the time limit (status $status): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || echo "requeue refused; submit the same command again to resume"
    fi
    return "$status"
}
