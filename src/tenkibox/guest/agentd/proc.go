package main

import (
	"os"
	"os/user"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const leaderGrace = 300 * time.Millisecond

type stdinItem struct {
	id    int64
	data  []byte
	close bool
}

type proc struct {
	a        *agent
	id       int64
	pid      int
	timedOut atomic.Bool
	exited   atomic.Bool

	mu       sync.Mutex // counters and flags below; held while sending output or the exit
	pending  int64      // output queued in the outbox (not yet written to the port)
	cv       *sync.Cond
	detached bool // exit reported: later pipe output is drained and dropped
	window   int64
	unacked  int64
	idle     [2]bool

	stdin     *os.File
	stdinMu   sync.Mutex
	stdinCv   *sync.Cond
	stdinQ    []stdinItem
	stdinEnd  bool // the process exited: the writer stops after the queue
	stdinDone bool // the writer is gone: further requests fail
}

func (p *proc) held() bool {
	return !p.detached && (p.pending >= outputLimit || p.window > 0 && p.unacked >= p.window)
}

// release: n bytes of this process's queued output were written to the port
func (p *proc) release(n int64) {
	p.mu.Lock()
	p.pending -= n
	p.cv.Broadcast()
	p.mu.Unlock()
}

func (p *proc) ack(n int64) {
	p.mu.Lock()
	p.unacked = maxInt64(0, p.unacked-n)
	p.cv.Broadcast()
	p.mu.Unlock()
}

func (p *proc) forgive() {
	p.mu.Lock()
	p.unacked = 0
	p.cv.Broadcast()
	p.mu.Unlock()
}

var eventNames = [2]string{"stdout", "stderr"}

func (p *proc) pump(i int, f *os.File, done chan<- struct{}) {
	defer func() { done <- struct{}{} }()
	buf := make([]byte, pipeRead)
	for {
		p.mu.Lock()
		for p.held() {
			p.cv.Wait()
		}
		p.idle[i] = true
		p.mu.Unlock()
		n, _ := f.Read(buf)
		p.mu.Lock()
		p.idle[i] = n <= 0 // a finished pump counts as idle
		if n <= 0 {
			p.cv.Broadcast()
			p.mu.Unlock()
			break
		}
		if p.detached {
			p.mu.Unlock()
			continue
		}
		// Sent under the process lock so that no output can follow the exit event.
		m := newMsg(p.id).str("event", eventNames[i])
		m.key("data")
		m.b = append(m.b, '"')
		m.b = appendBase64(m.b, buf[:n])
		m.b = append(m.b, '"')
		if p.a.out.put(m.done(), p, int64(n)) {
			p.pending += int64(n)
		}
		if p.window > 0 {
			p.unacked += int64(n)
		}
		p.mu.Unlock()
	}
	f.Close()
}

func (p *proc) wait(timeout time.Duration, done <-chan struct{}) {
	var timer *time.Timer
	if timeout > 0 {
		timer = time.AfterFunc(timeout, func() {
			p.timedOut.Store(true)
			p.signal(syscall.SIGKILL)
		})
	}
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(p.pid, &ws, 0, nil)
		if err != syscall.EINTR {
			break
		}
	}
	if timer != nil {
		timer.Stop()
	}
	p.exited.Store(true)
	exitedAt := time.Now()
	alive := 2
	tick := time.NewTimer(50 * time.Millisecond)
	for alive > 0 {
		select {
		case <-done:
			alive--
			continue
		case <-tick.C:
			tick.Reset(50 * time.Millisecond)
		}
		p.mu.Lock()
		idle := p.idle[0] && p.idle[1] // a finished pump leaves its flag set
		p.mu.Unlock()
		if idle && time.Since(exitedAt) >= leaderGrace {
			break
		}
	}
	tick.Stop()
	code := int64(ws.ExitStatus())
	if ws.Signaled() {
		code = 128 + int64(ws.Signal())
	}
	timedOut := p.timedOut.Load()
	if timedOut {
		code = 124
	}
	p.mu.Lock()
	p.detached = true
	p.cv.Broadcast()
	p.a.send(newMsg(p.id).str("event", "exit").int("exit_code", code).bool("timed_out", timedOut).done())
	p.mu.Unlock()
	if p.stdin != nil {
		p.stdinMu.Lock()
		p.stdinEnd = true
		p.stdinCv.Broadcast()
		p.stdinMu.Unlock()
	}
	p.a.procsMu.Lock()
	if p.a.procs[p.id] == p {
		delete(p.a.procs, p.id)
	}
	p.a.procsMu.Unlock()
}

func (p *proc) stdinWriter() {
	closed := false
	for {
		p.stdinMu.Lock()
		for len(p.stdinQ) == 0 && !p.stdinEnd {
			p.stdinCv.Wait()
		}
		if len(p.stdinQ) == 0 {
			p.stdinMu.Unlock()
			break
		}
		it := p.stdinQ[0]
		p.stdinQ = p.stdinQ[1:]
		p.stdinMu.Unlock()
		var err error
		if closed {
			err = &opError{"stdin is closed", "EPIPE"}
		} else if it.close {
			p.stdin.Close()
			closed = true
		} else {
			_, err = p.stdin.Write(it.data)
		}
		if err != nil {
			p.a.fail(it.id, err)
		} else {
			p.a.answer(okMsg(it.id))
		}
	}
	if !closed {
		p.stdin.Close()
	}
	p.stdinMu.Lock()
	p.stdinDone = true
	q := p.stdinQ
	p.stdinQ = nil
	p.stdinMu.Unlock()
	for _, it := range q {
		p.a.fail(it.id, &opError{"process has exited", "EPIPE"})
	}
}

func (p *proc) sendStdin(it stdinItem) error {
	if p.stdin == nil {
		return &opError{"process was started without stdin", "EBADF"}
	}
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdinDone {
		return &opError{"process has exited", "EPIPE"}
	}
	p.stdinQ = append(p.stdinQ, it)
	p.stdinCv.Broadcast()
	return nil
}

// signal: the whole group (`sh -c` and its children), not only the leader
func (p *proc) signal(sig syscall.Signal) {
	if err := syscall.Kill(-p.pid, sig); err == syscall.ESRCH && !p.exited.Load() {
		syscall.Kill(p.pid, sig)
	}
}

func isDir(path string) bool {
	var st syscall.Stat_t
	return syscall.Stat(path, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFDIR
}

func lookPath(argv0, path string) (string, error) {
	if strings.IndexByte(argv0, '/') >= 0 {
		return argv0, nil
	}
	for _, dir := range strings.Split(path, ":") {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + argv0
		var st syscall.Stat_t
		if syscall.Stat(p, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFREG && st.Mode&0o111 != 0 {
			return p, nil
		}
	}
	return "", osErr(syscall.ENOENT, argv0)
}

func (a *agent) opExec(id int64, r req) (*msg, error) {
	rawArgv, ok := r["argv"].([]any)
	if !ok || len(rawArgv) == 0 {
		return nil, einval("argv must be a non-empty list of strings")
	}
	argv := make([]string, len(rawArgv))
	for i, v := range rawArgv {
		s, ok := v.(string)
		if !ok || strings.IndexByte(s, 0) >= 0 {
			return nil, einval("argv must be a non-empty list of strings")
		}
		argv[i] = s
	}
	env := map[string]string{}
	for _, kv := range defaultEnv {
		env[kv[0]] = kv[1]
	}
	if extra := r["env"]; truthy(extra) {
		m, ok := extra.(map[string]any)
		if !ok {
			return nil, einval("env must map strings to strings")
		}
		for k, v := range m {
			s, ok := v.(string)
			if !ok {
				return nil, einval("env must map strings to strings")
			}
			env[k] = s
		}
	}
	cwd := "/"
	switch c := r["cwd"].(type) {
	case nil:
		if isDir(env["HOME"]) {
			cwd = env["HOME"]
		}
	case string:
		if !isDir(c) {
			return nil, &opError{"cwd " + c + ": no such directory", "ENOTDIR"}
		}
		cwd = c
	default:
		return nil, einval("cwd must be a string")
	}
	var cred *syscall.Credential
	if u, ok := r["user"]; ok && u != nil {
		uid, ok := u.(int64)
		if !ok || uid < 0 {
			return nil, einval("user must be a uid")
		}
		entry, err := user.LookupId(strconv.FormatInt(uid, 10))
		if err != nil {
			return nil, einval("no user with uid %d", uid)
		}
		gid, _ := strconv.Atoi(entry.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if gids, err := entry.GroupIds(); err == nil {
			for _, g := range gids {
				if n, err := strconv.Atoi(g); err == nil {
					cred.Groups = append(cred.Groups, uint32(n))
				}
			}
		}
	}
	var timeout time.Duration
	switch t := r["timeout_s"].(type) {
	case nil:
	case int64:
		if t <= 0 {
			return nil, einval("timeout_s must be a positive number")
		}
		timeout = time.Duration(t) * time.Second
	case float64:
		if t <= 0 {
			return nil, einval("timeout_s must be a positive number")
		}
		timeout = time.Duration(t * 1e9)
	case bool:
		if !t {
			return nil, einval("timeout_s must be a positive number")
		}
		timeout = time.Second
	default:
		return nil, einval("timeout_s must be a positive number")
	}
	a.procsMu.Lock()
	_, dup := a.procs[id]
	a.procsMu.Unlock()
	if dup {
		return nil, &opError{"id " + strconv.FormatInt(id, 10) + " is already a running process", "EEXIST"}
	}
	var window int64
	if truthy(r["credit"]) {
		w, err := r.int("window", ptr(creditWindow))
		if err != nil {
			return nil, err
		}
		window = maxInt64(creditMin, minInt64(w, creditMax))
	}
	prog, err := lookPath(argv[0], env["PATH"])
	if err != nil {
		return nil, err
	}
	envl := make([]string, 0, len(env))
	for k, v := range env {
		envl = append(envl, k+"="+v)
	}
	sort.Strings(envl)

	var outp, errp [2]int
	if err := syscall.Pipe2(outp[:], syscall.O_CLOEXEC); err != nil {
		return nil, osErr(err, "")
	}
	if err := syscall.Pipe2(errp[:], syscall.O_CLOEXEC); err != nil {
		syscall.Close(outp[0])
		syscall.Close(outp[1])
		return nil, osErr(err, "")
	}
	in := a.devnull
	inw := -1
	withStdin := truthy(r["stdin"])
	if withStdin {
		var inp [2]int
		if err := syscall.Pipe2(inp[:], syscall.O_CLOEXEC); err != nil {
			for _, fd := range []int{outp[0], outp[1], errp[0], errp[1]} {
				syscall.Close(fd)
			}
			return nil, osErr(err, "")
		}
		in, inw = inp[0], inp[1]
	}
	pid, err := a.spawn(prog, argv, cwd, envl, []uintptr{uintptr(in), uintptr(outp[1]), uintptr(errp[1])}, cred)
	syscall.Close(outp[1])
	syscall.Close(errp[1])
	if withStdin {
		syscall.Close(in)
	}
	if err != nil {
		closeAll(outp[0], errp[0], inw)
		if oe, ok := err.(*opError); ok {
			return nil, oe
		}
		return nil, osErr(err, argv[0])
	}
	p := &proc{a: a, id: id, pid: pid, window: window}
	p.cv = sync.NewCond(&p.mu)
	if inw >= 0 {
		syscall.SetNonblock(inw, true)
		p.stdin = os.NewFile(uintptr(inw), "stdin")
		p.stdinCv = sync.NewCond(&p.stdinMu)
	}
	syscall.SetNonblock(outp[0], true)
	syscall.SetNonblock(errp[0], true)
	a.procsMu.Lock()
	a.procs[id] = p
	a.procsMu.Unlock()
	// The answer goes out before the pumps start, so it precedes every event of this id.
	m := okMsg(id).int("pid", int64(pid))
	if window > 0 {
		m.int("window", window)
	}
	a.answer(m)
	done := make(chan struct{}, 2)
	go p.pump(0, os.NewFile(uintptr(outp[0]), "stdout"), done)
	go p.pump(1, os.NewFile(uintptr(errp[0]), "stderr"), done)
	if p.stdin != nil {
		go p.stdinWriter()
	}
	go p.wait(timeout, done)
	return nil, nil
}

func (a *agent) proc(r req) (*proc, error) {
	t, err := r.int("target", nil)
	if err != nil {
		return nil, err
	}
	a.procsMu.Lock()
	p := a.procs[t]
	a.procsMu.Unlock()
	if p == nil {
		return nil, &opError{"no process " + strconv.FormatInt(t, 10), "ESRCH"}
	}
	return p, nil
}

func (a *agent) opStdin(id int64, r req) (*msg, error) {
	data, err := r.b64("data")
	if err != nil {
		return nil, err
	}
	p, err := a.proc(r)
	if err != nil {
		return nil, err
	}
	return nil, p.sendStdin(stdinItem{id: id, data: data})
}

func (a *agent) opStdinClose(id int64, r req) (*msg, error) {
	p, err := a.proc(r)
	if err != nil {
		return nil, err
	}
	return nil, p.sendStdin(stdinItem{id: id, close: true})
}

func (a *agent) opAck(r req) {
	t, ok1 := r["target"].(int64)
	n, ok2 := r["bytes"].(int64)
	if !ok1 || !ok2 || n <= 0 {
		return
	}
	a.procsMu.Lock()
	p := a.procs[t]
	a.procsMu.Unlock()
	if p != nil {
		p.ack(n)
	}
}

func (a *agent) opKill(id int64, r req) (*msg, error) {
	sig, err := r.int("signal", ptr(9))
	if err != nil {
		return nil, err
	}
	if sig < 0 || sig >= 65 {
		return nil, einval("bad signal %d", sig)
	}
	p, err := a.proc(r)
	if err != nil {
		return nil, err
	}
	p.signal(syscall.Signal(sig))
	return okMsg(id), nil
}

func closeAll(fds ...int) {
	for _, fd := range fds {
		if fd >= 0 {
			syscall.Close(fd)
		}
	}
}

// spawn: prog started in a session of its own with files as its fds 0-2, as root or as cred's
// user. Go's child switches user before it changes directory, Python's Popen the other way
// round (there, a cwd only root may enter works). Go's order is tried first: it starts the
// program directly, where the launcher (agentd itself, Popen's order) costs one more program
// start, a Go runtime's, ~120 ms of a restored clone's first exec (226 against 105 ms as root,
// 4 clones each). When it fails, nothing ran (the child fails before its exec, and
// Go reaps it): the launcher tries again, so a cwd closed to the user works, and a failure
// names the step that failed (tests: recorded in .calls).
func (a *agent) spawn(prog string, argv []string, cwd string, envl []string, files []uintptr, cred *syscall.Credential) (int, error) {
	attr := &syscall.ProcAttr{Dir: cwd, Env: envl, Files: files,
		Sys: &syscall.SysProcAttr{Setsid: true, Credential: cred}}
	pid, err := syscall.ForkExec(prog, argv, attr)
	if err == nil || cred == nil {
		return pid, err
	}
	a.record("launcher " + strconv.FormatUint(uint64(cred.Uid), 10))
	return launchAs(prog, argv, cwd, envl, files, cred)
}

// launchAs: the launcher (execAs) starts prog as cred's user: it changes directory as root,
// switches user and execs the program, telling us on fd 3 (close-on-exec, so EOF means the
// program started) the step that failed and its errno.
func launchAs(prog string, argv []string, cwd string, envl []string, files []uintptr, cred *syscall.Credential) (int, error) {
	var report [2]int
	if err := syscall.Pipe2(report[:], syscall.O_CLOEXEC); err != nil {
		return 0, err
	}
	groups := make([]string, len(cred.Groups))
	for i, g := range cred.Groups {
		groups[i] = strconv.FormatUint(uint64(g), 10)
	}
	execArgv := append([]string{"agentd", execAsFlag, strconv.FormatUint(uint64(cred.Uid), 10),
		strconv.FormatUint(uint64(cred.Gid), 10), strings.Join(groups, ","), cwd, prog}, argv...)
	pid, err := syscall.ForkExec(selfExe(), execArgv, &syscall.ProcAttr{
		Env: envl, Files: append(files[:3:3], uintptr(report[1])),
		Sys: &syscall.SysProcAttr{Setsid: true},
	})
	syscall.Close(report[1])
	if err == nil {
		err = launchError(report[0], pid, cwd, argv[0])
	}
	syscall.Close(report[0])
	return pid, err
}

// selfExe: this program, to be started again as the launcher (/proc/self/exe works even when
// the file was replaced since)
func selfExe() string {
	var st syscall.Stat_t
	if syscall.Stat("/proc/self/exe", &st) == nil {
		return "/proc/self/exe"
	}
	if p, err := os.Executable(); err == nil {
		return p
	}
	return os.Args[0]
}

const execAsFlag = "--tenki-exec-as"

// launchError: what the launcher of process pid reported on fd (nil: the program started, its
// exec closed the pipe). A launcher that failed has exited; it is reaped here. The errors are
// Popen's: a chdir names the directory, an exec the program, a user switch nothing.
func launchError(fd, pid int, cwd, argv0 string) error {
	var buf [64]byte
	n := 0
	for n < len(buf) {
		m, err := syscall.Read(fd, buf[n:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil || m <= 0 {
			break
		}
		n += m
	}
	if n == 0 {
		return nil
	}
	var ws syscall.WaitStatus
	for {
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
			break
		}
	}
	step, code := string(buf[:n]), 0
	if i := strings.IndexByte(step, ':'); i >= 0 {
		code, _ = strconv.Atoi(step[i+1:])
		step = step[:i]
	}
	en := syscall.Errno(code)
	if code <= 0 {
		en = syscall.EIO
	}
	switch step {
	case "chdir":
		return osErr(en, cwd)
	case "exec":
		return osErr(en, argv0)
	}
	return osErr(en, "")
}

// execAs: the launcher of an exec as another user:
// agentd --tenki-exec-as UID GID G1,G2 CWD PROG ARGV... with fd 3 the report pipe (see
// launchError): "step:errno" is written there when a step fails, before exiting 127.
func execAs(args []string) {
	const report = 3
	syscall.CloseOnExec(report)
	fail := func(step string, err error) {
		code := int(syscall.EIO)
		if en, ok := err.(syscall.Errno); ok {
			code = int(en)
		}
		syscall.Write(report, []byte(step+":"+strconv.Itoa(code)))
		os.Exit(127)
	}
	if len(args) < 6 {
		fail("args", syscall.EINVAL)
	}
	uid, _ := strconv.Atoi(args[0])
	gid, _ := strconv.Atoi(args[1])
	groups := []int{}
	for _, g := range strings.Split(args[2], ",") {
		if n, err := strconv.Atoi(g); err == nil {
			groups = append(groups, n)
		}
	}
	if err := syscall.Chdir(args[3]); err != nil {
		fail("chdir", err)
	}
	if err := syscall.Setgroups(groups); err != nil {
		fail("setgroups", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		fail("setgid", err)
	}
	if err := syscall.Setuid(uid); err != nil {
		fail("setuid", err)
	}
	err := syscall.Exec(args[4], args[5:], os.Environ())
	fail("exec", err)
}
