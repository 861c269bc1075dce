import time, statistics, torch, torch.nn.functional as F
torch.set_num_threads(1); timer=time.thread_time
def bench(fn, n=7):
    fn(); ts=[]
    for _ in range(n):
        s=timer(); fn(); ts.append(timer()-s)
    return statistics.median(ts)
print(open('/proc/loadavg').read().strip())
Hkv,G,D,bs,L=3,3,64,64,30
for B in (8,32,64):
    nb=6; C=nb*bs; NB=B*nb+8
    caches=[(torch.randn(NB,bs,Hkv,D),torch.randn(NB,bs,Hkv,D)) for _ in range(L)]
    hm=[(k.permute(2,0,1,3).contiguous(),v.permute(2,0,1,3).contiguous()) for k,v in caches]
    blocks=torch.randperm(NB)[:B*nb]
    q=torch.randn(B,Hkv,G,D)
    lens=torch.randint(300,C,(B,))
    mb=(torch.arange(C)[None]<lens[:,None])[:,None,None,:]
    bufk=torch.empty(B*nb*bs*Hkv*D); bufv=torch.empty_like(bufk)
    def cur():
        for kc,vc in caches:
            k=torch.index_select(kc.view(NB,-1),0,blocks,out=bufk.view(B*nb,-1)).view(B,C,Hkv,D).transpose(1,2)
            v=torch.index_select(vc.view(NB,-1),0,blocks,out=bufv.view(B*nb,-1)).view(B,C,Hkv,D).transpose(1,2)
            F.scaled_dot_product_attention(q,k,v,attn_mask=mb,scale=0.125)
    def new():
        for kc,vc in hm:
            k=torch.index_select(kc.view(Hkv,NB,-1),1,blocks,out=bufk.view(Hkv,B*nb,-1)).view(Hkv,B,C,D).transpose(0,1)
            v=torch.index_select(vc.view(Hkv,NB,-1),1,blocks,out=bufv.view(Hkv,B*nb,-1)).view(Hkv,B,C,D).transpose(0,1)
            F.scaled_dot_product_attention(q,k,v,attn_mask=mb,scale=0.125)
    def gcur():
        for kc,vc in caches:
            torch.index_select(kc.view(NB,-1),0,blocks,out=bufk.view(B*nb,-1)); torch.index_select(vc.view(NB,-1),0,blocks,out=bufv.view(B*nb,-1))
    def gnew():
        for kc,vc in hm:
            torch.index_select(kc.view(Hkv,NB,-1),1,blocks,out=bufk.view(Hkv,B*nb,-1)); torch.index_select(vc.view(Hkv,NB,-1),1,blocks,out=bufv.view(Hkv,B*nb,-1))
    r={n:bench(f) for n,f in [("cur",cur),("new",new),("gather_cur",gcur),("gather_new",gnew)]}
    print(B, " ".join(f"{k} {v*1e3:.1f}" for k,v in r.items()), f"speedup {r['cur']/r['new']:.2f}", flush=True)
print(open('/proc/loadavg').read().strip())
