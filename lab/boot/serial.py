"""What a booting guest says on its serial console, and what that means for the boot.

Markers come from the initramfs (`QRMFS-BOOT`), the image's /sbin/qrmfs-init (`qrmfs-init: `) and the
probes (`QRMFS-PROBE`, `QRMFS-OUT`). Without a probe (kernel `qrmfs.probe=0`) the init's own messages
tell the state: SysV init's `INIT: Entering runlevel: N`, systemd's `Reached target ... Multi-User System`
or (systemd goes quiet on a console a getty took) a getty's `login:` prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PROBE, OUT, BOOTMARK = "QRMFS-PROBE", "QRMFS-OUT", "QRMFS-BOOT"
INITMARK = "qrmfs-init: "  # the image's /sbin/qrmfs-init (per-node set-up) says this on the console
SYSTEMD_STATE = "multi-user.target"
SYSV_RUNLEVEL = "3"  # the qrm runlevel (manual: initdefault 3)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SYSV_BOOTING = re.compile(r"INIT: version \S+ booting")
SYSV_RUNLEVEL_RE = re.compile(r"INIT: Entering runlevel: (\S+)")
SYSTEMD_RUNNING = re.compile(r"systemd\[1\]: systemd \d+\S* running in system mode|Welcome to .*!")
SYSTEMD_MULTI_USER = re.compile(r"Reached target (multi-user\.target|Multi-User System)")
LOGIN_PROMPT = re.compile(r"^\S+ login: ?")
SYSV_FAIL = re.compile(r"\[FAIL\] (.*)$")
# openQRM's linuxrc and root-mount.nfs-deployment (the openQRM boot, lab/boot/openqrm.py): where they give up,
# they start a shell on the console and wait there, so these lines end the boot at once.
OPENQRM_FATAL = re.compile(r"^(ERROR: Could not (?:reach the openQRM-Server|mount) .*"
                           r"|WARNING: Failed to get the openqrm-client package.*"
                           r"|Failed to load network module.*"
                           r"|Resource IP: .* Detected initrd as initramfs, starting a shell)$")
OPENQRM_MOUNTED = re.compile(r"^nfs-storage: Mounted (\S+) rw$")
OPENQRM_IMAGE = re.compile(r"^Image Type: '([^']*)' - Appliance Name: '([^']*)'$")


@dataclass
class SerialReport:
    """What the serial console said, line by line (`feed_line`)."""

    mounted: bool = False
    switched_to: str | None = None
    fatal: str | None = None
    init: str | None = None           # "systemd" or "sysv", from the init's own first words (or the probe)
    runlevel: str | None = None       # SysV: the last `INIT: Entering runlevel: N`
    multi_user: bool = False          # systemd said it reached multi-user.target
    getty: bool = False               # a `login:` prompt appeared on the console
    reached: bool = False             # the probe ran: the normal running state was reached
    rc_done: bool = False             # SysV: the probe ran after the runlevel's rc scripts
    uptime: float | None = None
    system_state: str | None = None
    failed_units: list[str] = field(default_factory=list)
    script_started: bool = False
    script_lines: list[str] = field(default_factory=list)
    script_rc: int | None = None
    done: bool = False
    unpack_error: str | None = None   # the kernel could not unpack (all of) the initramfs
    node_setup: str | None = None     # qrmfs-init's verdict: "complete" or "incomplete" (None: it did not run)
    node_errors: list[str] = field(default_factory=list)  # its ERROR and WARNING lines
    openqrm_image_type: str | None = None  # openQRM's linuxrc: the image type get_parameter gave
    openqrm_appliance: str | None = None   # ... and the appliance's name
    openqrm_root: str | None = None        # root-mount.nfs-deployment mounted this (SERVER:PATH)

    @property
    def state(self) -> str:
        """The normal running state this kind of image boots to."""
        return f"runlevel {SYSV_RUNLEVEL}" if self.init == "sysv" else SYSTEMD_STATE

    def reached_without_probe(self) -> bool:
        """With the probe off: the init's own messages say the running state was reached (SysV: init
        entered runlevel 3; its rc scripts are done once a getty of the inittab prompts, because init
        starts those only after the runlevel's `wait` rc entry)."""
        if self.init == "sysv":
            return self.runlevel == SYSV_RUNLEVEL
        # systemd stops printing its status on the serial console once a getty runs there, so its
        # `Reached target multi-user.target` often never shows: a getty's prompt (getty.target is part of
        # multi-user.target) stands for it.
        return self.init == "systemd" and (self.multi_user or self.getty)

    def feed_line(self, raw: str) -> None:  # noqa: C901 - one dispatch over the console's marker lines
        line = ANSI.sub("", raw.replace("\r", "").rstrip("\n"))
        if "Initramfs unpacking failed:" in line and self.unpack_error is None:
            self.unpack_error = line.split("Initramfs unpacking failed:", 1)[1].strip()
        i = line.find(OUT)
        if i >= 0 and self.script_started and self.script_rc is None:
            rest = line[i + len(OUT):]
            self.script_lines.append(rest[1:] if rest.startswith(" ") else rest)
            return
        self._init_line(line)
        if self._openqrm_line(line):
            return
        i = line.find(INITMARK)
        if i >= 0:
            msg = line[i + len(INITMARK):].strip()
            if msg.startswith("set-up complete"):
                self.node_setup = "complete"
            elif msg.startswith("set-up incomplete"):
                self.node_setup = "incomplete"
            elif msg.startswith(("ERROR", "WARNING")):
                self.node_errors.append(msg)
            return
        i = line.find(BOOTMARK + " ")
        if i >= 0:
            msg = line[i + len(BOOTMARK) + 1:].strip()
            if msg.startswith("FATAL "):
                self.fatal = msg[len("FATAL "):]
            elif msg.startswith("mounted "):
                self.mounted = True
            elif msg.startswith("switch_root "):
                self.switched_to = msg.split(" ", 1)[1]
            return
        i = line.find(PROBE + " ")
        if i >= 0:
            self._probe_line(line[i + len(PROBE) + 1:].strip())

    def feed_partial(self, raw: str) -> None:
        """The console's unfinished last line: a getty's `login: ` prompt ends without a newline."""
        if not self.getty and LOGIN_PROMPT.match(ANSI.sub("", raw.replace("\r", ""))):
            self.getty = True

    def _init_line(self, line: str) -> None:
        if SYSV_BOOTING.search(line):
            self.init = "sysv"
        elif self.init is None and SYSTEMD_RUNNING.search(line) and "INIT:" not in line:
            self.init = "systemd"
        m = SYSV_RUNLEVEL_RE.search(line)
        if m:
            self.init = "sysv"
            self.runlevel = m.group(1)
        if SYSTEMD_MULTI_USER.search(line):
            self.multi_user = True
        if LOGIN_PROMPT.match(line):
            self.getty = True
        m = SYSV_FAIL.search(line)
        if m and self.init == "sysv":
            self.failed_units.append(m.group(1).strip())

    def _openqrm_line(self, line: str) -> bool:
        """openQRM's linuxrc and root-mount: what they were told, what they mounted, where they gave up."""
        m = OPENQRM_IMAGE.match(line)
        if m:
            self.openqrm_image_type, self.openqrm_appliance = m.group(1), m.group(2)
            return True
        m = OPENQRM_MOUNTED.match(line)
        if m:
            self.mounted, self.openqrm_root = True, m.group(1)
            return True
        if OPENQRM_FATAL.match(line) and self.fatal is None:
            self.fatal = f"openQRM's linuxrc: {line}"
            return True
        return False

    def _probe_line(self, msg: str) -> None:  # noqa: C901 - one dispatch over the probe's report lines
        # The probe starts only once the state is reached, so any of its lines proves it; the first one
        # can be lost: a getty starting on the serial console flushes what the tty has not sent yet.
        if not self.reached:
            self.reached = True
            m = re.search(r"uptime=([0-9.]+)", msg)
            self.uptime = float(m.group(1)) if m else None
        if msg.startswith("reached "):
            m = re.search(r"init=(\w+)", msg)
            if m:
                self.init = m.group(1)
            m = re.search(r"runlevel (\S+)", msg)
            if m and m.group(1) != "?":
                self.runlevel = m.group(1)
        elif msg.startswith("state="):
            self.system_state = msg.split()[0].split("=", 1)[1]
            if self.system_state == "rc-done":
                self.rc_done = True
        elif msg.startswith("failed-unit "):
            self.failed_units.append(msg.split()[1])
        elif msg == "script-begin":
            self.script_started = True
        elif msg.startswith("script-end"):
            m = re.search(r"rc=(-?\d+)", msg)
            self.script_rc = int(m.group(1)) if m else -1
        elif msg == "done":
            self.done = True


def parse_serial(text: str) -> SerialReport:
    report = SerialReport()
    for line in text.splitlines():
        report.feed_line(line)
    return report


def tail(path: Path, lines: int = 40) -> str:
    """The end of the console log, without colour codes and carriage returns."""
    try:
        text = path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


def judge(  # noqa: C901, PLR0913 - the verdict weighs every fact of a boot, in one place
          report: SerialReport, *, timed_out: bool, returncode: int | None, timeout: float,
          script_given: bool = False, clean_poweroff: bool = False, clean_shutdown: bool = True,
          shutdown_timeout: float = 60, qemu_err: str = "", probe: bool = True) -> tuple[str, str | None]:
    """(state, error) of a boot from what the console said and how QEMU ended; error None = success."""
    unpack = (f" (the kernel could not unpack the initramfs: {report.unpack_error})"
              if report.unpack_error else "")
    state = report.state
    if probe and report.reached:
        if timed_out and not report.done:
            what = "the test script did not finish" if report.script_started else "the probe did not finish"
            return state, f"timeout after {timeout:.0f}s: the guest reached {state} but {what}"
        if clean_poweroff and not clean_shutdown:
            return state, (f"the orderly shutdown did not finish within {shutdown_timeout:.0f}s "
                           "(see the end of the console log)")
        if script_given and report.script_rc is None:
            what = ("the test script did not run" if not report.script_started
                    else "the guest stopped before the test script finished")
            return state, what + unpack
        if not report.done:
            return state, f"the guest stopped (QEMU exit {returncode}) before the probe finished"
        return state, _node_error(report)
    if not probe and report.reached_without_probe():
        return state, _node_error(report)
    if report.fatal:
        return f"initramfs: {report.fatal}", f"the initramfs gave up: {report.fatal}"
    if timed_out:
        stage = (f"after switch_root to {report.switched_to}" if report.switched_to
                 else "after mounting the NFS root" if report.mounted else "before the NFS root was mounted")
        if not probe and report.init == "sysv":
            stage += f"; runlevel {report.runlevel or 'none'}, {'a' if report.getty else 'no'} getty"
        return "timeout", f"no {state} within {timeout:.0f}s ({stage})" + unpack
    error = f"QEMU exited with {returncode} before the guest reached {state}" + unpack
    if qemu_err:
        error += f": {qemu_err[-500:]}"
    return f"qemu exited ({returncode})", error


def _node_error(report: SerialReport) -> str | None:
    if report.node_setup == "incomplete":
        why = "; ".join(report.node_errors[-3:]) or "see the console log"
        return f"qrmfs-init could not set up the node (private directories or identity): {why}"
    return None
