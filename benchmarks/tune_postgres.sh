#!/usr/bin/env bash
# bash benchmarks/tune_postgres.sh [TRIALS]
# Two `msakit tune` workers sharing one Optuna study in a throwaway local PostgreSQL server (the
# Debian `postgresql` package; `apt-get install postgresql` and `pip install psycopg2-binary`),
# then the summary + final run from a third call, then the server is stopped and removed.
# LF-DNN on the small embedded synthetic data, 5 epochs a trial: about 2-4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-8}
PORT=${PGPORT:-54329}
OUT=${OUT:-runs/tune_postgres}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/msakit-pg.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

as_pg "$PGBIN/initdb" -D "$WORK/data" -U msakit --auth=trust > /dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w \
    -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1" start > /dev/null
stop() { as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast -w stop > /dev/null || true; rm -rf "$WORK"; }
trap stop EXIT
as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U msakit optuna
URL="postgresql+psycopg2://msakit@127.0.0.1:$PORT/optuna"
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on port $PORT; study storage $URL"

mkdir -p "$OUT"
ARGS=(tune --model lf_dnn --trials "$TRIALS" --storage "$URL" --study lf_dnn-postgres --out "$OUT"
      --epochs 5 --quiet --set data.synthetic.train_size=300 data.synthetic.valid_size=100
      data.synthetic.test_size=100 train.num_threads=1)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
python -m msakit "${ARGS[@]}" --no-final > "$OUT/worker1.log" 2>&1 & one=$!
python -m msakit "${ARGS[@]}" --no-final > "$OUT/worker2.log" 2>&1 & two=$!
wait "$one" && wait "$two"
echo "two workers: $(( $(date +%s) - started )) s"
python -m msakit "${ARGS[@]}" --final-seeds 1 2     # the study is done: summary, best.yaml, final run
python - "$URL" <<'PY'
import collections, sys, optuna
study = optuna.load_study(study_name="lf_dnn-postgres", storage=sys.argv[1])
by_worker = collections.Counter(t.user_attrs.get("worker") for t in study.trials)
states = collections.Counter(t.state.name for t in study.trials)
print(f"trials by worker: {dict(by_worker)}; states: {dict(states)}")
PY
