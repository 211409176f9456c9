# python ab2.py threads nsA nsB shapes rounds [nchw]: median and quartiles of per-round time ratios B/A
import sys, time, math, torch, statistics as st
sys.path.insert(0, '/tmp/sfdev'); import lib
from falconnet import malloc_tuning
malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[1]))
import os
def mk(spec):
    ns, _, env = spec.partition(':')
    op = lib.get(ns)
    def call(*a):
        for k in ('PFD','NCHWPF','NXT','SPREAD','TOUCH','HINT','SUPER','LANESG','DEV1','DEV2','DEV3'): os.environ.pop(k, None)
        for kv in filter(None, env.split('+')):
            k, v = kv.split('='); os.environ[k] = v
        return op(*a)
    return call
A, B = mk(sys.argv[2]), mk(sys.argv[3])
SH=[(32,128,56,8),(128,32,56,4),(64,256,28,16),(256,64,28,8),(128,512,14,16),(512,128,14,8),(256,1024,7,32),(1024,256,7,16)]
sel = range(8) if sys.argv[4]=='all' else [int(i) for i in sys.argv[4].split(',')]
R = int(sys.argv[5])
fmt = torch.contiguous_format if 'nchw' in sys.argv else torch.channels_last
for i in sel:
    C_in,C_out,hw,k = SH[i]; c_h,G=k,C_in//k; m=C_out//c_h
    x=torch.randn(16,C_in,hw,hw).contiguous(memory_format=fmt)
    w1=torch.randn(G,c_h,k)/math.sqrt(k); w2=torch.randn(c_h,m,G)/math.sqrt(G)
    if 'bwd' in sys.argv:
        gy = torch.randn(16,C_out,hw,hw).contiguous(memory_format=fmt)
        fa = lambda: A(gy,x,w1,w2,None,'none'); fb = lambda: B(gy,x,w1,w2,None,'none')
    else:
        res = torch.randn(16,C_out,hw,hw).contiguous(memory_format=fmt) if 'res' in sys.argv else None
        fa = lambda: A(x,w1,w2,None,res,'none'); fb = lambda: B(x,w1,w2,None,res,'none')
    for _ in range(3): fa(); fb()
    ta, tb, rat = [], [], []
    for r in range(R):
        order = (fa, fb) if r % 2 == 0 else (fb, fa)
        t = {}
        for f in order:
            s = time.perf_counter(); f(); t[f] = time.perf_counter() - s
        ta.append(t[fa]); tb.append(t[fb]); rat.append(t[fb] / t[fa])
    q = st.quantiles(rat, n=4)
    print(f"{C_in}->{C_out}@{hw}: {sys.argv[2]} min {min(ta)*1e3:.3f} med {st.median(ta)*1e3:.3f}  {sys.argv[3]} min {min(tb)*1e3:.3f} med {st.median(tb)*1e3:.3f}  B/A per-round median {st.median(rat):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})", flush=True)
