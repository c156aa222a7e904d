#!/usr/bin/perl
# Small-file metadata workload: create N files of SIZE bytes in DIR, stat them all, delete
# them all, in one process (no fork per file). Prints one line per phase:
#   create <seconds> <ops/s>
#   stat   <seconds> <ops/s>
#   unlink <seconds> <ops/s>
# Usage: smallfiles.pl DIR [N=10000] [SIZE=1024]
# If $SMALLFILES_HOOK is set, it is run (with sh) before the first phase and after each
# phase, outside the timed part, and its output is printed as "hook <phase> <output>"
# (bench/run.sh uses it to read the wisp server's request counter between phases).
use strict;
use warnings;
use Time::HiRes qw(time);

my ($dir, $n, $size) = @ARGV;
die "usage: $0 DIR [N] [SIZE]\n" unless defined $dir;
$n //= 10000;
$size //= 1024;
my $buf = 'x' x $size;
mkdir $dir or die "mkdir $dir: $!\n";
my @names = map { sprintf "%s/f%05d", $dir, $_ } 0 .. $n - 1;

sub hook {
    my ($phase) = @_;
    return unless $ENV{SMALLFILES_HOOK};
    my $out = `$ENV{SMALLFILES_HOOK}`;
    chomp $out;
    print "hook $phase $out\n";
}

hook('start');
my $t = time;
for my $f (@names) {
    open(my $fh, '>', $f) or die "create $f: $!\n";
    syswrite($fh, $buf) == $size or die "write $f: $!\n";
    close($fh) or die "close $f: $!\n";
}
my $dt = time - $t;
printf "create %.3f %.0f\n", $dt, $n / $dt;
hook('create');

$t = time;
for my $f (@names) {
    my @st = stat($f) or die "stat $f: $!\n";
    $st[7] == $size or die "size of $f is $st[7]\n";
}
$dt = time - $t;
printf "stat %.3f %.0f\n", $dt, $n / $dt;
hook('stat');

$t = time;
for my $f (@names) {
    unlink($f) or die "unlink $f: $!\n";
}
$dt = time - $t;
printf "unlink %.3f %.0f\n", $dt, $n / $dt;
hook('unlink');
rmdir $dir or die "rmdir $dir: $!\n";
