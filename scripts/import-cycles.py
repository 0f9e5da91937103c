#!/usr/bin/env python3
# Fails when two modules of src/ import each other, directly or in a loop: builds the crate:: import
# graph between top-level modules (src/bin/ apart) and prints its strongly connected components.
import os,re,sys
root=sys.argv[1] if len(sys.argv)>1 else 'src'
mods={}
for dp,_,fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)
        if rel.startswith('bin/') or rel in('main.rs','lib.rs'): continue
        top=rel.split('/')[0].replace('.rs','')
        txt=open(p).read()
        # crate::x  and use crate::{a, b}
        deps=set(re.findall(r'crate::([a-z_]+)',txt))
        for grp in re.findall(r'crate::\{([^}]*)\}',txt):
            deps|=set(re.findall(r'(?:^|,)\s*([a-z_]+)',grp))
        mods.setdefault(top,set()).update(d for d in deps if d!=top)
names=set(mods)
g={m:{d for d in ds if d in names} for m,ds in mods.items()}
# tarjan
idx={};low={};st=[];on=set();out=[];c=[0]
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in g[v]:
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: out.append(comp)
sys.setrecursionlimit(10000)
for v in g:
    if v not in idx: sc(v)
print("import cycles:",out if out else "none")
for comp in out:
    for a in comp:
        print(" ",a,"->",sorted(g[a]&set(comp)))
sys.exit(1 if out else 0)
