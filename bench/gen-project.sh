#!/usr/bin/env bash
# Generate a small C project for the build benchmark: NSRC source files of FUNCS functions
# each, one shared header, a main.c and a Makefile (compile each file, link one program).
# Usage: gen-project.sh DIR [NSRC=200] [FUNCS=5]
set -euo pipefail
dir=$1 nsrc=${2:-200} funcs=${3:-5}
mkdir -p "$dir/src"
{
    echo '#ifndef PROJ_H'
    echo '#define PROJ_H'
    echo '#include <stddef.h>'
    echo 'struct acc { unsigned long sum; unsigned long mix; };'
    for ((i = 0; i < nsrc; i++)); do
        for ((j = 0; j < funcs; j++)); do echo "unsigned long f${i}_${j}(struct acc *a, unsigned long x);"; done
    done
    echo '#endif'
} >"$dir/proj.h"
for ((i = 0; i < nsrc; i++)); do
    {
        echo '#include "proj.h"'
        echo '#include <string.h>'
        for ((j = 0; j < funcs; j++)); do
            cat <<C
unsigned long f${i}_${j}(struct acc *a, unsigned long x)
{
    char buf[64];
    unsigned long h = x * 2654435761u + ${i}u;
    for (int k = 0; k < 64; k++) {
        buf[k] = (char)(h >> (k % 8));
        h = (h ^ (unsigned long)buf[k]) * 1099511628211u;
    }
    if (h % 7 == ${j}) a->mix ^= h;
    a->sum += h + strlen(buf);
    return h;
}
C
        done
    } >"$dir/src/f$i.c"
done
{
    echo '#include <stdio.h>'
    echo '#include "proj.h"'
    echo 'int main(void)'
    echo '{'
    echo '    struct acc a = {0, 0};'
    echo '    unsigned long x = 1;'
    for ((i = 0; i < nsrc; i++)); do echo "    x = f${i}_$((i % funcs))(&a, x);"; done
    echo '    printf("%lu %lu\n", a.sum, a.mix);'
    echo '    return 0;'
    echo '}'
} >"$dir/src/main.c"
cat >"$dir/Makefile" <<'MK'
CC ?= cc
CFLAGS ?= -O2 -Wall
SRCS := $(sort $(wildcard src/*.c))
OBJS := $(SRCS:.c=.o)

prog: $(OBJS)
	$(CC) -o $@ $(OBJS)

src/%.o: src/%.c proj.h
	$(CC) $(CFLAGS) -I. -c -o $@ $<

clean:
	rm -f prog $(OBJS)
.PHONY: clean
MK
