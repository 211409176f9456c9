# SF-Conv (installed op) vs dense oneDNN 1x1, alternated calls (order flipped every round), min of 21 rounds: python sfall2.py cl,nchw THREADS [bwd]
import sys, time, math, torch, torch.nn.functional as F, statistics as st
import falconnet_kernels as fk
from falconnet import malloc_tuning
malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv)>2 else 2)
bwd = 'bwd' in sys.argv
SH=[(32,128,56,8),(128,32,56,4),(64,256,28,16),(256,64,28,8),(128,512,14,16),(512,128,14,8),(256,1024,7,32),(1024,256,7,16)]
layouts = sys.argv[1].split(',') if len(sys.argv)>1 else ['cl']
for lay in layouts:
  fmt = torch.channels_last if lay=='cl' else torch.contiguous_format
  rs=[]
  for C_in,C_out,hw,k in SH:
    c_h,G=k,C_in//k; m=C_out//c_h
    x=torch.randn(16,C_in,hw,hw).contiguous(memory_format=fmt)
    w1=torch.randn(G,c_h,k)/math.sqrt(k); w2=torch.randn(c_h,m,G)/math.sqrt(G)
    wd=fk.sf_conv_dense_weight(w1,w2).reshape(C_out,C_in,1,1).contiguous(memory_format=fmt)
    if bwd:
        x.requires_grad_(); w1.requires_grad_(); w2.requires_grad_(); wd.requires_grad_()
        gy=torch.randn(16,C_out,hw,hw).contiguous(memory_format=fmt)
        sf=lambda: fk.sf_conv(x,w1,w2).backward(gy)
        dense=lambda: F.conv2d(x,wd).backward(gy)
    else:
        sf=lambda: fk.sf_conv(x,w1,w2); dense=lambda: F.conv2d(x,wd)
    for f in (sf,dense):
        for _ in range(3): f()
    r={'sf':[], 'dense':[]}
    for i in range(21):
        for name,f in ((('sf',sf),('dense',dense)) if i%2==0 else (('dense',dense),('sf',sf))):
            t=time.perf_counter(); f(); r[name].append(time.perf_counter()-t)
    a,b=min(r['sf'])*1e3, min(r['dense'])*1e3
    gb=16*hw*hw*(C_in+C_out)*4/a/1e6
    rs.append(b/a)
    print(f"{lay} {C_in}->{C_out}@{hw} sf {a:.3f} dense {b:.3f} ms  {b/a:.2f}x  sf {gb:.1f} GB/s", flush=True)
  print(lay, 'geomean %.2fx min %.2fx'%(math.exp(sum(map(math.log,rs))/len(rs)), min(rs)))
