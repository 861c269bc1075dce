import time, statistics, torch, torch.nn.functional as F
torch.set_num_threads(1); timer=time.thread_time
def bench(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        s=timer(); fn(); ts.append(timer()-s)
    return statistics.median(ts)
print(open('/proc/loadavg').read().strip())
for name,(N,K),L in [("gate_up",(3072,576),30),("down",(576,1536),30),("qkv",(960,576),30),("lm_head",(49152,576),1)]:
    Ws=[torch.randn(N,K)*0.02 for _ in range(L)]
    pk=[torch.ops.mkldnn._reorder_linear_weight(w,None) for w in Ws]
    for M in (1,2,4,8,16,32,64,128,256,512):
        x=torch.randn(M,K)
        a=bench(lambda:[F.linear(x,w) for w in Ws]); b=bench(lambda:[torch.ops.mkldnn._linear_pointwise(x,p,None,"none",[],"") for p in pk])
        print(f"{name} M={M}: mkl {a*1e3/L:.3f} onednn {b*1e3/L:.3f} ratio {a/b:.2f}",flush=True)
print(open('/proc/loadavg').read().strip())
