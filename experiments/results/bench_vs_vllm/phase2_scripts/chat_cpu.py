"""The chat workload (bench_vs_vllm's: 32 requests at t=0, greedy, EOS ignored) through fastgen's engine in one
thread, timed in the thread's CPU time and in wall time; prints the output token ids' hash to compare trees."""
import hashlib, os, sys, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
import torch
torch.set_num_threads(1)
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir
import bench_vs_hf as hfb
from fastgen.models import load_model
from fastgen.workloads import WorkloadConfig
extra = sys.argv[1:]
wl = OmegaConf.merge(OmegaConf.structured(WorkloadConfig), OmegaConf.load("conf/workload/chat.yaml"), {"num_requests": 32, "warmup": False})
wcfg = OmegaConf.to_object(wl)
m, tok = load_model("smollm2-135m", dtype="float32")
reqs = hfb.make_requests(wcfg, m.spec.vocab_size, tok)
fg = hfb.build_fastgen(m, tok, "splitfuse", "float32", ["hardware.threads=1", *extra])
hfb.fastgen_run(fg, hfb.warmup_requests(reqs))
c0, w0 = time.thread_time(), time.perf_counter()
wall, outs, steps = hfb.fastgen_run(fg, reqs)
cpu = time.thread_time() - c0
toks = sum(len(q.prompt) + q.max_new_tokens for q in reqs)
print(f"{os.getcwd()} {extra}: cpu {cpu:.1f} s, wall {wall:.1f} s, {toks / cpu:.1f} tok/s of CPU time, "
      f"{len(steps)} steps, outputs {hashlib.sha1(str(outs).encode()).hexdigest()[:12]}, load {os.getloadavg()[0]:.2f}", flush=True)
