#!/usr/bin/env bash
# Tests the logic of ../ringtune.sbatch with fake srun, scontrol and ringtune
# (fakes/), in a clean environment: the commands each task runs, the token
# handling, the config check, dry runs, and that no process outlives the
# script. Run by `cargo test` (coordinator/tests/slurm_script.rs) or directly.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT="$HERE/../ringtune.sbatch"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failed_cases=
cases=0

fail() {
    echo "FAIL [$case_name]: $*" >&2
    echo "----- output -----" >&2
    cat "$WORK/out" >&2 || true
    echo "----- fake log -----" >&2
    cat "$WORK/log" >&2 2>/dev/null || true
    echo "------------------" >&2
    [[ " $failed_cases " == *" $case_name "* ]] || failed_cases+=" $case_name"
}

# run_case NAME EXPECTED_RC [VAR=value ...] -- CONFIG
# Runs the script with only PATH (fakes first), HOME and the given variables.
run_case() {
    case_name=$1 expected_rc=$2
    shift 2
    local vars=()
    while [[ $1 != -- ]]; do vars+=("$1"); shift; done
    shift
    cases=$((cases + 1))
    rm -f "$WORK/log" "$WORK/tokens" "$WORK/coordinator.pid" "$WORK/node.pids" "$WORK/fingerprint.path"
    local rc=0
    env -i PATH="$HERE/fakes:/usr/bin:/bin" HOME="$WORK" TMPDIR="$WORK" FAKE_LOG="$WORK/log" FAKE_DIR="$WORK" \
        FAKE_FINGERPRINT="$FAKE_FINGERPRINT" "${vars[@]}" bash "$SCRIPT" "$@" >"$WORK/out" 2>&1 || rc=$?
    if [[ $rc != "$expected_rc" ]]; then
        fail "exit status $rc, expected $expected_rc"
        return 1
    fi
}

expect_out() { grep -qF -- "$1" "$WORK/out" || fail "output lacks: $1"; }
expect_log() { grep -qxF -- "$1" "$WORK/log" || fail "fake log lacks line: $1"; }
expect_log_count() {
    local n
    n=$(grep -c -- "$1" "$WORK/log" 2>/dev/null || true)
    [[ $n == "$2" ]] || fail "fake log has $n lines matching '$1', expected $2"
}
# Whether a process runs (a zombie left to an init that does not reap, as in
# some containers, has exited and does not count).
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $state && $state != Z* ]]
}
# The coordinator the script started must be gone once the script returns.
expect_no_orphan() {
    [[ -f $WORK/coordinator.pid ]] || { fail "the coordinator never started"; return; }
    if alive "$(cat "$WORK/coordinator.pid")"; then
        fail "the coordinator (pid $(cat "$WORK/coordinator.pid")) outlived the script"
        kill -KILL "$(cat "$WORK/coordinator.pid")" 2>/dev/null || true
    fi
}
# No token may appear in what the script prints.
expect_token_hidden() {
    local t
    ! grep -qE '[0-9a-f]{64}' "$WORK/out" || fail "something like a generated token appears in the output"
    [[ -f $WORK/tokens ]] || return 0
    while read -r t; do
        [[ -z $t ]] || ! grep -qF -- "$t" "$WORK/out" || fail "the token appears in the output"
    done <"$WORK/tokens"
}

FAKE_FINGERPRINT=sha256:$(printf 'ab%.0s' {1..32})
# The fingerprint file is gone once the script is (it lives in a private folder).
expect_fingerprint_cleaned() {
    [[ -f $WORK/fingerprint.path ]] || { fail "the coordinator was given no --fingerprint-file"; return; }
    local f
    f=$(cat "$WORK/fingerprint.path")
    [[ ! -e $f && ! -e $(dirname "$f") ]] || fail "$f (or its folder) outlived the script"
}

cfg() { # cfg NAME BODY: a config file
    printf '%b' "$2" >"$WORK/$1"
    echo "$WORK/$1"
}

ALLOC=(SLURM_JOB_NODELIST='gpu[01-02]' FAKE_HOSTS='gpu01 gpu02' SLURM_NTASKS_PER_NODE=4 SLURMD_NODENAME=gpu01)
C8=$(cfg c8.toml 'seed = 1\nnodes = 8   # 2 hosts x 4 GPUs\n[train]\nnodes_note = 3\n')

# --- a dry run prints one line per task and starts nothing ---------------------------
if run_case dry-run 0 "${ALLOC[@]}" DRY_RUN=1 -- "$C8"; then
    expect_out "ringtune on Slurm (dry run): 2 hosts x 4 GPUs = 8 node processes"
    expect_out "cluster token: generated for this job (not shown)"
    expect_out "coordinator certificate: pinned by its fingerprint"
    expect_out "coordinator on gpu01: ringtune coordinator $C8 --listen 0.0.0.0:29500 --auto-resume --fingerprint-file <private folder>/coordinator.fingerprint"
    expect_out "task 0 on gpu01 (SLURM_PROCID=0 SLURM_LOCALID=0): ringtune node --coordinator gpu01:29500 --device cuda:0"
    expect_out "task 5 on gpu02 (SLURM_PROCID=5 SLURM_LOCALID=1): ringtune node --coordinator gpu01:29500 --device cuda:1"
    expect_out "task 7 on gpu02 (SLURM_PROCID=7 SLURM_LOCALID=3): ringtune node --coordinator gpu01:29500 --device cuda:3"
    [[ $(grep -c '^task ' "$WORK/out") == 8 ]] || fail "expected 8 task lines"
    ! grep -q '^srun\|^coordinator\|^node' "$WORK/log" || fail "a dry run started something"
    expect_token_hidden
fi

# --- dry run off-cluster: the bash host-list fallback, a token file, a port ----------
echo secret-token-value >"$WORK/token"
chmod 600 "$WORK/token"
C6=$(cfg c6.toml 'nodes = 6\n')
if run_case dry-run-fallback 0 SLURM_JOB_NODELIST='n[8-10]' RINGTUNE_GPUS_PER_NODE=2 RINGTUNE_SCONTROL=/nonexistent \
    RINGTUNE_TOKEN_FILE="$WORK/token" RINGTUNE_PORT=4000 RINGTUNE_BIN=/opt/rt/ringtune DRY_RUN=1 -- "$C6"; then
    expect_out "cluster token: the file $WORK/token"
    expect_out "coordinator on n8: /opt/rt/ringtune coordinator $C6 --listen 0.0.0.0:4000 --token-file $WORK/token"
    expect_out "task 4 on n10 (SLURM_PROCID=4 SLURM_LOCALID=0): /opt/rt/ringtune node --coordinator n8:4000 --device cuda:0 --token-file $WORK/token"
    ! grep -q secret-token-value "$WORK/out" || fail "the token file's content was printed"
fi

# --- a real (fake) launch: coordinator once, one node per GPU, same token everywhere ---
if run_case launch 0 "${ALLOC[@]}" -- "$C8"; then
    expect_log "srun nodes=2 ntasks=8 per_node=4 cmd=bash"
    for p in 0 1 2 3 4 5 6 7; do
        host=gpu0$((p / 4 + 1))
        expect_log "node procid=$p host=$host args=--coordinator gpu01:29500 --device cuda:$((p % 4))"
    done
    expect_log_count '^node ' 8
    [[ $(sort -u "$WORK/tokens" | wc -l) == 1 && -n $(head -1 "$WORK/tokens") ]] ||
        fail "the coordinator and the nodes did not all get the same, non-empty token"
    # Every node pins the certificate the coordinator wrote the fingerprint of.
    expect_log_count "^pin procid=[0-7] pin=$FAKE_FINGERPRINT ca=unset\$" 8
    grep -q "^coordinator args=$C8 --listen 0.0.0.0:29500 --auto-resume --fingerprint-file $WORK/ringtune-.*/coordinator.fingerprint\$" "$WORK/log" ||
        fail "the coordinator was not given a fingerprint file in a private folder"
    expect_fingerprint_cleaned
    expect_token_hidden
    expect_no_orphan
fi

# --- a stale pin in the environment is not passed on; the coordinator's is, and an
# --- empty CA variable is unset rather than handed to the nodes -----------------------
if run_case stale-pin 0 "${ALLOC[@]}" RINGTUNE_COORDINATOR_FINGERPRINT=sha256:0000 RINGTUNE_COORDINATOR_CA= -- "$C8"; then
    expect_log_count "^pin procid=[0-7] pin=$FAKE_FINGERPRINT ca=unset\$" 8
fi

# --- an operator's certificate and CA: the coordinator presents it, the nodes check it --
echo cert >"$WORK/cert.pem"
echo key >"$WORK/key.pem"
echo ca >"$WORK/ca.pem"
if run_case operator-ca 0 "${ALLOC[@]}" RINGTUNE_TLS_CERT="$WORK/cert.pem" RINGTUNE_TLS_KEY="$WORK/key.pem" \
    RINGTUNE_COORDINATOR_CA="$WORK/ca.pem" RINGTUNE_COORDINATOR_FINGERPRINT=sha256:0000 -- "$C8"; then
    expect_log "coordinator args=$C8 --listen 0.0.0.0:29500 --tls-cert $WORK/cert.pem --tls-key $WORK/key.pem --auto-resume"
    expect_log_count "^pin procid=[0-7] pin=none ca=$WORK/ca.pem\$" 8
    expect_out "its certificate: checked against the CA file $WORK/ca.pem for the name gpu01"
    expect_no_orphan
fi
# ... and without a CA file the nodes pin that certificate's fingerprint.
if run_case operator-cert 0 "${ALLOC[@]}" RINGTUNE_TLS_CERT="$WORK/cert.pem" RINGTUNE_TLS_KEY="$WORK/key.pem" -- "$C8"; then
    grep -q "^coordinator args=$C8 --listen 0.0.0.0:29500 --tls-cert $WORK/cert.pem --tls-key $WORK/key.pem --auto-resume --fingerprint-file " "$WORK/log" ||
        fail "the coordinator was not given the certificate and a fingerprint file"
    expect_log_count "^pin procid=[0-7] pin=$FAKE_FINGERPRINT ca=unset\$" 8
fi
if run_case half-tls 2 "${ALLOC[@]}" RINGTUNE_TLS_CERT="$WORK/cert.pem" -- "$C8"; then
    expect_out "set both RINGTUNE_TLS_CERT and RINGTUNE_TLS_KEY, or neither"
fi
if run_case ca-without-cert 2 "${ALLOC[@]}" RINGTUNE_COORDINATOR_CA="$WORK/ca.pem" -- "$C8"; then
    expect_out "RINGTUNE_COORDINATOR_CA needs the certificate it issued"
fi

# --- a coordinator that ends before it listens: no node is started ------------------
if run_case coordinator-fails-early 4 "${ALLOC[@]}" FAKE_COORD_FAIL=4 -- "$C8"; then
    expect_out "the coordinator exited (status 4) before it listened; no node was started"
    ! grep -q '^srun\|^node' "$WORK/log" || fail "nodes were started"
    [[ -z $(find "$WORK" -maxdepth 1 -name 'ringtune-*' -type d) ]] || fail "the private folder was left behind"
fi

# --- RINGTUNE_TOKEN from the environment is passed on, and one bound GPU is cuda:0 -----
if run_case env-token 0 "${ALLOC[@]}" RINGTUNE_TOKEN=tok-from-env CUDA_VISIBLE_DEVICES=3 -- "$C8"; then
    [[ $(sort -u "$WORK/tokens") == tok-from-env ]] || fail "RINGTUNE_TOKEN did not reach every process"
    expect_log "node procid=6 host=gpu02 args=--coordinator gpu01:29500 --device cuda:0"
    expect_out "token: RINGTUNE_TOKEN from the environment (not shown)"
    expect_token_hidden
fi

# --- a node fails: the script fails with srun's status and stops the coordinator -----
if run_case node-fails 3 "${ALLOC[@]}" FAKE_FAIL_RANK=5 FAKE_COORD_SECONDS=30 RINGTUNE_STOP_GRACE=1 -- "$C8"; then
    expect_out "node processes failed (srun exit status 3)"
    expect_out "the coordinator is still running 1s after the nodes exited; stopping it"
    expect_no_orphan
fi

# --- config and allocation mismatches are caught before anything starts -------------
C2=$(cfg c2.toml '[train]\nnodes = 8\n')
if run_case world-mismatch 2 "${ALLOC[@]}" -- "$C2"; then
    expect_out "$C2 says nodes = 1, but this job runs 8 node processes (2 hosts x 4 GPUs)"
    [[ ! -s $WORK/log ]] || ! grep -q '^srun\|^coordinator' "$WORK/log" || fail "started despite the mismatch"
fi
if run_case no-allocation 2 -- "$C8"; then
    expect_out "not inside a Slurm allocation"
fi
if run_case no-config 2 "${ALLOC[@]}" --; then
    expect_out "usage: sbatch"
fi
if run_case missing-config 2 "${ALLOC[@]}" -- "$WORK/nope.toml"; then
    expect_out "config file '$WORK/nope.toml' not found"
fi
if run_case bad-token-file 2 "${ALLOC[@]}" RINGTUNE_TOKEN_FILE="$WORK/none" -- "$C8"; then
    expect_out "RINGTUNE_TOKEN_FILE='$WORK/none' is not a readable file"
fi
if run_case bad-port 2 "${ALLOC[@]}" RINGTUNE_PORT=99999 -- "$C8"; then
    expect_out "RINGTUNE_PORT='99999' is not a port number"
fi
if run_case no-gpu-count 2 SLURM_JOB_NODELIST=a FAKE_HOSTS=a -- "$C8"; then
    expect_out "cannot tell how many GPUs per host"
fi

# --- coordinator flags after the config; --auto-resume unless asked otherwise; srun ---
# --- gets --export=ALL and the job's --cpus-per-task ----------------------------------
if run_case flags 0 "${ALLOC[@]}" SLURM_CPUS_PER_TASK=6 -- "$C8" --max-restarts 2 --set 'train.max_steps=9'; then
    grep -q "^coordinator args=$C8 --listen 0.0.0.0:29500 --auto-resume --max-restarts 2 --set train.max_steps=9 --fingerprint-file " "$WORK/log" ||
        fail "the coordinator did not get --auto-resume and the flags"
    expect_log "srun-options export=ALL cpus=6"
fi
if run_case no-auto-resume 0 "${ALLOC[@]}" RINGTUNE_AUTO_RESUME=0 DRY_RUN=1 -- "$C8"; then
    expect_out "coordinator on gpu01: ringtune coordinator $C8 --listen 0.0.0.0:29500 --fingerprint-file"
fi
if run_case explicit-resume 0 "${ALLOC[@]}" DRY_RUN=1 -- "$C8" --resume; then
    expect_out "coordinator on gpu01: ringtune coordinator $C8 --listen 0.0.0.0:29500 --resume --fingerprint-file"
fi
if run_case bad-auto-resume 2 "${ALLOC[@]}" RINGTUNE_AUTO_RESUME=yes -- "$C8"; then
    expect_out "RINGTUNE_AUTO_RESUME='yes' is not 0 or 1"
fi

# --- SIGTERM (scancel, time limit) stops everything -----------------------------------
case_name=sigterm
cases=$((cases + 1))
rm -f "$WORK/log" "$WORK/tokens" "$WORK/coordinator.pid" "$WORK/node.pids" "$WORK/fingerprint.path"
env -i PATH="$HERE/fakes:/usr/bin:/bin" HOME="$WORK" TMPDIR="$WORK" FAKE_LOG="$WORK/log" FAKE_DIR="$WORK" \
    FAKE_FINGERPRINT="$FAKE_FINGERPRINT" "${ALLOC[@]}" FAKE_COORD_SECONDS=30 FAKE_NODE_SECONDS=30 RINGTUNE_STOP_GRACE=1 bash "$SCRIPT" "$C8" >"$WORK/out" 2>&1 &
pid=$!
for _ in $(seq 100); do
    [[ $(grep -c '^node ' "$WORK/log" 2>/dev/null) == 8 ]] && break
    sleep 0.05
done
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
[[ $rc == 143 ]] || fail "exit status $rc after SIGTERM, expected 143 (128 + SIGTERM)"
expect_out "interrupted; stopping the coordinator and the nodes"
expect_no_orphan
# The nodes srun started must be gone too (the fake srun forwards SIGTERM as srun does).
sleep 0.2
while read -r p; do
    if alive "$p"; then
        fail "node process $p outlived the script"
        kill -KILL "$p" 2>/dev/null || true
    fi
done <"$WORK/node.pids"
[[ $(wc -l <"$WORK/node.pids") == 8 ]] || fail "expected 8 node pids"
expect_fingerprint_cleaned

read -ra failed <<<"$failed_cases"
echo "$((cases - ${#failed[@]})) of $cases ringtune.sbatch cases passed${failed_cases:+ (failed:$failed_cases)}"
((${#failed[@]} == 0))
