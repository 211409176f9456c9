import time, torch, torch.nn.functional as F, falconnet_kernels as fk, statistics as st
from falconnet import malloc_tuning; malloc_tuning.apply()
torch.set_num_threads(2)
for C,H in [(128,56),(256,28),(512,14),(1024,7)]:
    x=torch.randn(16,C,H,H).contiguous(memory_format=torch.channels_last); w=torch.randn(C,1,3,3); b=torch.randn(C)
    f1=lambda: fk.dw_conv3x3(x,w,b,1,"relu"); f2=lambda: F.relu(F.conv2d(x,w,b,padding=1,groups=C))
    r={0:[],1:[]}
    for _ in range(3): f1(); f2()
    for _ in range(15):
        for i,f in enumerate((f1,f2)):
            t=time.perf_counter(); f(); r[i].append(time.perf_counter()-t)
    a,b_=st.median(r[0])*1e3, st.median(r[1])*1e3
    print(C,H,'dw %.2f ms onednn %.2f ms ratio %.2f'%(a,b_,b_/a))
