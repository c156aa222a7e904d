#!/usr/bin/env python3
"""Summarise several bench/run.sh result files: median [min-max] of every figure over the
runs (builds: over every round), and the median of ratios paired within one run (small
files, sequential I/O) or one build round (builds), which is what docs/benchmarks.md quotes.
Usage: bench/aggregate.py bench/results/FILE...
"""
import re,sys,statistics as st,glob
runs=sys.argv[1:]
data=[]
for f in runs:
    d={}
    for l in open(f):
        if l.startswith('#') or l.startswith('==') or not l.strip(): continue
        p=l.split()
        if len(p)>=2 and re.match(r'^[a-z0-9_]+\.[A-Za-z0-9_.]+$',p[0]):
            d[p[0]]=p[1:]
    data.append(d)
def vals(key):
    out=[]
    for d in data:
        rk=[k for k in d if re.fullmatch(key.replace('.build.','.build.r\\d+.').replace('.build_rexec.','.build_rexec.r\\d+.').replace('.','\\.').replace('\\\\d+','\\d+').replace('r\\\\d','r\\d'),k)]
        if ('.build' in key) and rk:
            out+= [float(d[k][0]) for k in rk]
        elif key in d:
            out.append(float(d[key][0]))
    return out
keys=['create.ops_per_s','stat.ops_per_s','unlink.ops_per_s','seq_write.MBps','seq_read_cold.MBps','seq_read_cached.MBps','build.unpack_s','build.s','build.noop_s']
print('%-22s'%'metric', *['%-26s'%f for f in ['ext4','sshfs','wisp']], 'wisp/ext4 wisp/sshfs (median ratio per run)')
for k in keys:
    row=[]
    meds={}
    for fs in ['ext4','sshfs','wisp']:
        v=vals(fs+'.'+k)
        if not v: row.append('-'); continue
        meds[fs]=st.median(v)
        row.append('%g [%g-%g] n=%d'%(round(st.median(v),3),min(v),max(v),len(v)))
    # per-run ratio
    rat=[]
    for d in data:
        pass
    print('%-22s'%k, *['%-26s'%r for r in row], '%.2f %.2f'%(meds['wisp']/meds['ext4'], meds['wisp']/meds['sshfs']))
for k in ['wisp.seq_read_cold_ws2.MBps','wisp.build_rexec.s','wisp.build.rpcs','wisp.build.noop_rpcs','wisp.build_rexec.rpcs','wisp.build_rexec.callbacks','wisp.build.callbacks','wisp.build_rexec.jobs_on_ws2','wisp.build_rexec.jobs_local','wisp.null_rpc_ms','wisp.background_rpc_per_s','wisp.create.rpcs_per_file','wisp.stat.rpcs_per_file','wisp.unlink.rpcs_per_file','wisp.create.callbacks','wisp.unlink.callbacks']:
    v=vals(k)
    if v: print('%-30s median %g [%g-%g] n=%d'%(k,round(st.median(v),3),min(v),max(v),len(v)))
print('\npaired ratios (same run / same build round), median [min-max]:')
def paired(k):
    rw,rs=[],[]
    for d in data:
        rounds=sorted({m.group(1) for kk in d for m in [re.match(r'ext4\.build\.(r\d+)\.',kk)] if m}) if k.startswith('build.') else []
        keysets=[k.replace('build.','build.%s.'%r) for r in rounds] if rounds else [k]
        for kk in keysets:
            if all(('%s.%s'%(fs,kk)) in d for fs in ['ext4','sshfs','wisp']):
                e,s,w=[float(d['%s.%s'%(fs,kk)][0]) for fs in ['ext4','sshfs','wisp']]
                rw.append(w/e); rs.append(w/s)
    return rw,rs
for k in keys:
    rw,rs=paired(k)
    print('%-22s wisp/ext4 %.2f [%.2f-%.2f]  wisp/sshfs %.2f [%.2f-%.2f] n=%d'%(k,st.median(rw),min(rw),max(rw),st.median(rs),min(rs),max(rs),len(rw)))
# rexec vs wisp make -j2 and vs ext4 paired
rr=[];re4=[]
for d in data:
    hasr=any(re.match(r'wisp\.build_rexec\.r\d+\.s$',k) for k in d)
    for r in (['r%d.'%i for i in range(1,6)] if hasr else ['']):
        a='wisp.build_rexec.%ss'%r; b='wisp.build.%ss'%r; c='ext4.build.%ss'%r
        if a in d and b in d and c in d:
            rr.append(float(d[a][0])/float(d[b][0])); re4.append(float(d[a][0])/float(d[c][0]))
print('rexec/wisp-j2 %.2f [%.2f-%.2f]  rexec/ext4 %.2f [%.2f-%.2f] n=%d'%(st.median(rr),min(rr),max(rr),st.median(re4),min(re4),max(re4),len(rr)))
