#!/bin/bash
# before (main 9b06cfc, exported to /tmp/dec/main) and after (this branch), alternated, one thread, CPU time
export OMP_NUM_THREADS=1
A="--batches 1 8 32 64 --context 340 --threads 1 --timer cpu --repeats 5"
for round in 1 2; do
  echo "##### round $round: BEFORE (main)"; uptime
  (cd /tmp/dec/main && PYTHONPATH=/tmp/dec/main python experiments/profile_decode.py $A 2>&1 | grep -v "Convert\|Loading")
  echo "##### round $round: AFTER (decode-speed, linear auto)"; uptime
  (cd /work/wt/decode && PYTHONPATH=/work/wt/decode python experiments/profile_decode.py $A 2>&1 | grep -v "Convert\|Loading")
  if [ $round = 1 ]; then
  echo "##### round $round: AFTER, linear plain (head-major KV + F.rms_norm only)"; uptime
  (cd /work/wt/decode && PYTHONPATH=/work/wt/decode python experiments/profile_decode.py $A --linear plain 2>&1 | grep -v "Convert\|Loading")
  fi
done
uptime
