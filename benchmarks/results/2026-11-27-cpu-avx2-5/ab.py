# python ab.py threads "ns1,ns2" shapes(all|idx,idx) [rounds] [nchw]
import sys, time, math, torch, statistics as st, torch.nn.functional as F
sys.path.insert(0, '/tmp/sfdev'); import lib
import falconnet_kernels as fk
from falconnet import malloc_tuning
malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[1]))
import os
ops = {}
for spec in sys.argv[2].split(','):
    ns, _, env = spec.partition(':')
    op = lib.get(ns)
    def call(*a, op=op, env=env):
        for k in ('STOP','PFD','NOPF','TOUCH','GMAX','V','ST','MD','SUPER_KB'): os.environ.pop(k, None)
        for kv in filter(None, env.split('+')):
            k, v = kv.split('='); os.environ[k] = v
        return op(*a)
    ops[spec] = call
SH=[(32,128,56,8),(128,32,56,4),(64,256,28,16),(256,64,28,8),(128,512,14,16),(512,128,14,8),(256,1024,7,32),(1024,256,7,16)]
sel = range(8) if sys.argv[3]=='all' else [int(i) for i in sys.argv[3].split(',')]
R = int(sys.argv[4]) if len(sys.argv)>4 else 15
fmt = torch.contiguous_format if 'nchw' in sys.argv else torch.channels_last
ratios = {ns: [] for ns in ops}
for i in sel:
    C_in,C_out,hw,k = SH[i]; c_h,G=k,C_in//k; m=C_out//c_h
    x=torch.randn(16,C_in,hw,hw).contiguous(memory_format=fmt)
    w1=torch.randn(G,c_h,k)/math.sqrt(k); w2=torch.randn(c_h,m,G)/math.sqrt(G)
    wd=fk.sf_conv_dense_weight(w1,w2).reshape(C_out,C_in,1,1).contiguous(memory_format=fmt)
    if 'bwd' in sys.argv:
        gy = torch.randn(16,C_out,hw,hw).contiguous(memory_format=fmt)
        fs = {ns: (lambda op=op: op(gy,x,w1,w2,None,'none')) for ns,op in ops.items()}
        fs['dense'] = lambda: torch.ops.aten.convolution_backward(gy, x, wd, None, [1,1],[0,0],[1,1],False,[0,0],1,[True,True,False])
    else:
        fs = {ns: (lambda op=op: op(x,w1,w2,None,None,'none')) for ns,op in ops.items()}
        fs['dense'] = lambda: F.conv2d(x, wd)

    r = {n: [] for n in fs}
    for _ in range(2):
        for f in fs.values(): f()
    items = list(fs.items())
    for i in range(R):
        for n,f in items[i % len(items):] + items[:i % len(items)]:  # rotated: no op always follows the same one
            t=time.perf_counter(); f(); r[n].append(time.perf_counter()-t)
    d = min(r['dense'])
    line = f"{C_in}->{C_out}@{hw}: dense {d*1e3:.3f}"
    for ns in ops:
        a = min(r[ns]); ratios[ns].append(d/a)
        line += f"  {ns} {a*1e3:.3f} ({d/a:.2f}x)"
    print(line, flush=True)
for ns, rs in ratios.items():
    print(ns, 'geomean %.2fx min %.2fx' % (math.exp(sum(map(math.log, rs))/len(rs)), min(rs)))
