#!/bin/busybox sh
# /init of the stock-Linux guest that pvmm boots inside the SVM bed. It proves userspace,
# a ticking timer, working time, serial input and output, and a clean reboot. Each check
# prints one LINUX-* line; tests/svm-bed/run.sh judges them.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

echo "LINUX-MARKER userspace reached: $(uname -r)"
echo "LINUX-CPUS $(grep -c '^processor' /proc/cpuinfo)"

timer_ticks() { # sum of the timer interrupt lines (LAPIC timer and the legacy timer)
    awk '/LOC:|timer/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }' \
        /proc/interrupts
}

grep -E 'LOC:|timer' /proc/interrupts | sed 's/^/LINUX-IRQ /'
a=$(timer_ticks)
read -r up0 _ </proc/uptime
sleep 1
read -r up1 _ </proc/uptime
b=$(timer_ticks)
echo "LINUX-TIMER before=$a after=$b"
echo "LINUX-SLEEP uptime_before=$up0 uptime_after=$up1"
echo "LINUX-CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"
dmesg | grep -i -E 'tsc|apic|mp-table|MPTABLE|clocksource|calibrat' | head -20 | sed 's/^/LINUX-DMESG /'

echo "LINUX-READY-FOR-INPUT"
if read -r -t 120 line; then
    echo "LINUX-ECHO $line"
else
    echo "LINUX-ECHO-TIMEOUT"
fi
echo "LINUX-REBOOT"
reboot -f
