// agentd, tenki's guest agent: serves docs/agent-protocol.md on the virtio-serial port
// org.tenki.agent. Native, not a Python program: a restored clone runs every code path for the
// first time in a new QEMU whose translation cache is empty, and an interpreter was a third of
// the guest code translated between a resume and the first exec's answer. Standard library
// only, built static (images/agentd.py). Its behaviour is the Python agent's, which it
// replaced (now tests/support/pyagent.py; tests/unit/test_agent_protocol.py holds both to the
// protocol).
package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const (
	version        = "0.5.2" // digits and dots only: the host compares it as a tuple of ints
	implementation = "native-go"
	portName       = "org.tenki.agent"
	maxChunk       = 1 << 20
	outputLimit    = 4 << 20
	creditWindow   = 2 << 20
	creditMin      = 256 << 10
	creditMax      = 16 << 20
	maxLine        = 16 << 20
	pipeRead       = 1 << 16
	defaultPath    = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	rndAddEntropy  = 0x40085203
	rndReseedCRNG  = 0x5207
	hostnameChars  = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"
	waitFileLimit  = 60 * time.Second
)

var defaultEnv = [][2]string{
	{"PATH", defaultPath},
	{"HOME", "/root"},
	{"USER", "root"},
	{"LOGNAME", "root"},
	{"SHELL", "/bin/bash"},
	{"LANG", "C.UTF-8"},
	{"DEBIAN_FRONTEND", "noninteractive"},
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tenki-agent: "+format+"\n", args...)
}

// opError: a request failed; errno travels to the host as "errno" (null when "").
type opError struct {
	msg   string
	errno string
}

func (e *opError) Error() string { return e.msg }

func einval(format string, args ...any) *opError {
	return &opError{fmt.Sprintf(format, args...), "EINVAL"}
}

var errnoNames = map[syscall.Errno]string{
	syscall.EPERM: "EPERM", syscall.ENOENT: "ENOENT", syscall.ESRCH: "ESRCH",
	syscall.EINTR: "EINTR", syscall.EIO: "EIO", syscall.ENXIO: "ENXIO", syscall.E2BIG: "E2BIG",
	syscall.ENOEXEC: "ENOEXEC", syscall.EBADF: "EBADF", syscall.ECHILD: "ECHILD",
	syscall.EAGAIN: "EAGAIN", syscall.ENOMEM: "ENOMEM", syscall.EACCES: "EACCES",
	syscall.EFAULT: "EFAULT", syscall.EBUSY: "EBUSY", syscall.EEXIST: "EEXIST",
	syscall.EXDEV: "EXDEV", syscall.ENODEV: "ENODEV", syscall.ENOTDIR: "ENOTDIR",
	syscall.EISDIR: "EISDIR", syscall.EINVAL: "EINVAL", syscall.ENFILE: "ENFILE",
	syscall.EMFILE: "EMFILE", syscall.ENOTTY: "ENOTTY", syscall.ETXTBSY: "ETXTBSY",
	syscall.EFBIG: "EFBIG", syscall.ENOSPC: "ENOSPC", syscall.ESPIPE: "ESPIPE",
	syscall.EROFS: "EROFS", syscall.EMLINK: "EMLINK", syscall.EPIPE: "EPIPE",
	syscall.ERANGE: "ERANGE", syscall.ENAMETOOLONG: "ENAMETOOLONG", syscall.ENOSYS: "ENOSYS",
	syscall.ENOTEMPTY: "ENOTEMPTY", syscall.ELOOP: "ELOOP", syscall.EDQUOT: "EDQUOT",
	syscall.EOPNOTSUPP: "EOPNOTSUPP", syscall.ETIMEDOUT: "ETIMEDOUT",
}

// osErr turns a syscall error into Python's OSError wording: "[Errno 2] No such file or
// directory: 'path'".
func osErr(err error, path string) *opError {
	if oe, ok := err.(*opError); ok {
		return oe
	}
	if pe, ok := err.(*os.PathError); ok {
		err, path = pe.Err, pe.Path
	}
	if le, ok := err.(*os.LinkError); ok {
		err, path = le.Err, le.Old
	}
	en, ok := err.(syscall.Errno)
	if !ok {
		return &opError{err.Error(), ""}
	}
	text := en.Error()
	if text != "" {
		text = strings.ToUpper(text[:1]) + text[1:]
	}
	m := fmt.Sprintf("[Errno %d] %s", int(en), text)
	if path != "" {
		m += ": '" + path + "'"
	}
	return &opError{m, errnoNames[en]}
}

// -- request arguments, checked like the Python agent's _int/_str/_b64 -------------------------

type req map[string]any

func (r req) int(key string, def *int64) (int64, error) {
	v, ok := r[key]
	if !ok {
		if def != nil {
			return *def, nil
		}
		return 0, einval("%s must be an integer", key)
	}
	n, ok := v.(int64)
	if !ok {
		return 0, einval("%s must be an integer", key)
	}
	return n, nil
}

func ptr(n int64) *int64 { return &n }

// boolean: the field as a bool, def when absent; anything else than a bool is refused
func (r req) boolean(key string, def bool) (bool, error) {
	v, ok := r[key]
	if !ok {
		return def, nil
	}
	b, ok := v.(bool)
	if !ok {
		return false, einval("%s must be true or false", key)
	}
	return b, nil
}

func (r req) str(key string) (string, error) {
	s, ok := r[key].(string)
	if !ok || s == "" || strings.IndexByte(s, 0) >= 0 {
		return "", einval("%s must be a non-empty string", key)
	}
	return s, nil
}

func (r req) b64(key string) ([]byte, error) {
	v, ok := r[key]
	if !ok {
		return nil, nil
	}
	s, ok := v.(string)
	if !ok {
		return nil, einval("%s must be a base64 string", key)
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, einval("%s is not valid base64", key)
	}
	return b, nil
}

// truthy: Python's bool() of a JSON value
func truthy(v any) bool {
	switch x := v.(type) {
	case nil:
		return false
	case bool:
		return x
	case int64:
		return x != 0
	case float64:
		return x != 0
	case string:
		return x != ""
	case []any:
		return len(x) > 0
	case map[string]any:
		return len(x) > 0
	}
	return true
}

// -- the agent --------------------------------------------------------------------------------

type agent struct {
	port    port
	root    string // "" in a VM; tests: /etc below it, no clock, hostname or entropy
	testing bool
	warm    *warmup
	out     *outbox
	procsMu sync.Mutex
	procs   map[int64]*proc
	bootID  string
	devnull int
}

func (a *agent) send(b []byte) {
	a.out.put(b, nil, 0)
}

func (a *agent) answer(m *msg) { a.send(m.done()) }

func (a *agent) fail(id int64, err error) {
	oe := osErr(err, "")
	m := newMsg(id).raw("ok", "false").str("error", oe.msg)
	if oe.errno == "" {
		m.raw("errno", "null")
	} else {
		m.str("errno", oe.errno)
	}
	a.send(m.done())
}

func (a *agent) serve() {
	buf := make([]byte, pipeRead)
	var line []byte
	connected := false
	for {
		n := a.port.read(buf)
		if n <= 0 {
			if connected {
				logf("host disconnected")
				connected = false
				a.newHost()
			}
			line = line[:0]
			a.port.waitHost()
			continue
		}
		if !connected {
			logf("host connected")
			connected = true
		}
		data := buf[:n]
		for {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				line = append(line, data...)
				break
			}
			var l []byte
			if len(line) > 0 {
				line = append(line, data[:i]...)
				l = line
			} else {
				l = data[:i]
			}
			data = data[i+1:]
			if len(l) == 0 {
				a.newHost() // a host starts each connection with an empty line
			} else if len(bytes.TrimSpace(l)) > 0 {
				a.dispatch(l)
			}
			line = line[:0]
		}
		if len(line) > maxLine {
			line = nil
		}
	}
}

func (a *agent) newHost() {
	a.procsMu.Lock()
	for _, p := range a.procs {
		p.forgive()
	}
	a.procsMu.Unlock()
}

func (a *agent) dispatch(line []byte) {
	m, ok := parseObject(line)
	if !ok {
		return
	}
	r := req(m)
	id, ok := r["id"].(int64)
	if !ok {
		return
	}
	op, _ := r["op"].(string)
	var h func(int64, req) (*msg, error)
	inline := false
	switch op {
	case "ping":
		h, inline = a.opPing, true
	case "settle":
		h, inline = a.opSettle, true
	case "ack":
		a.opAck(r)
		return
	case "stdin":
		h, inline = a.opStdin, true
	case "stdin_close":
		h, inline = a.opStdinClose, true
	case "kill":
		h, inline = a.opKill, true
	case "set_time":
		h, inline = a.opSetTime, true
	case "exec":
		h = a.opExec
	case "reidentify":
		h = a.opReidentify
	case "sync":
		h = a.opSync
	case "read_file":
		h = a.opReadFile
	case "write_file":
		h = a.opWriteFile
	case "rename":
		h = a.opRename
	case "remove":
		h = a.opRemove
	case "mount":
		h = a.opMount
	case "umount":
		h = a.opUmount
	default:
		name := "None"
		if s, ok := r["op"].(string); ok {
			name = "'" + s + "'"
		}
		a.fail(id, &opError{"unknown op " + name, "ENOSYS"})
		return
	}
	if inline {
		a.handle(id, h, r)
	} else {
		go a.handle(id, h, r)
	}
}

func (a *agent) handle(id int64, h func(int64, req) (*msg, error), r req) {
	m, err := h(id, r)
	if err != nil {
		a.fail(id, err)
	} else if m != nil {
		a.answer(m)
	}
}

func okMsg(id int64) *msg { return newMsg(id).raw("ok", "true") }

// -- ping, clock, identity --------------------------------------------------------------------

type timespec struct{ sec, nsec int64 }

func clockGet(clock int) float64 {
	var ts timespec
	syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, uintptr(clock), uintptr(unsafe.Pointer(&ts)), 0)
	return float64(ts.sec) + float64(ts.nsec)/1e9
}

func (a *agent) opPing(id int64, r req) (*msg, error) {
	// warm (from 0.5.1): a restore's first ping starts the warm-up (in a goroutine: the answer
	// goes out meanwhile), so that it runs during the settle, ahead of the user's first exec
	warm, err := r.boolean("warm", false)
	if err != nil {
		return nil, err
	}
	// settle (from 0.5.2): a restore's first request is its settle too, one round trip less
	// (its epoch_ns is the host's time when it sent the request, right after the resume)
	var settle req
	if v, ok := r["settle"]; ok {
		m, isMap := v.(map[string]any)
		if !isMap {
			return nil, einval("settle must be an object")
		}
		settle = req(m)
	}
	var m *msg
	if settle != nil {
		// the settle's order: setting the clock waits for every vCPU to take an interrupt,
		// and one that runs the warm-up's first steps takes it late (docs/snapshots.md)
		start := time.Now()
		if m, err = a.settle(id, settle, warm); err != nil {
			return nil, err
		}
		// clock_ns: the clock as the answer leaves, for the host to see how late the request
		// was read (a guest that just woke reads its first one late: its clock is behind)
		m.bool("settled", true).float("took_s", time.Since(start).Seconds()).
			int("clock_ns", time.Now().UnixNano())
	} else {
		a.pokeIf(warm)
		m = okMsg(id)
	}
	up := clockGet(7) // CLOCK_BOOTTIME
	up = float64(int64(up*100+0.5)) / 100
	return m.str("boot_id", a.bootID).int("pid", int64(os.Getpid())).
		float("uptime_s", up).str("version", version).str("implementation", implementation), nil
}

// pokeIf starts the warm-up when asked to (and the agent has one)
func (a *agent) pokeIf(warm bool) {
	if warm && a.warm != nil {
		a.record("poke")
		a.warm.poke()
	}
}

func (a *agent) setTime(id int64, r req) (*msg, error) {
	epoch, err := r.int("epoch_ns", nil)
	if err != nil {
		return nil, err
	}
	before := time.Now().UnixNano()
	a.record("clock " + strconv.FormatInt(epoch, 10))
	if !a.testing {
		ts := timespec{epoch / 1e9, epoch % 1e9}
		if ts.nsec < 0 {
			ts.sec--
			ts.nsec += 1e9
		}
		if _, _, e := syscall.Syscall(syscall.SYS_CLOCK_SETTIME, 0, uintptr(unsafe.Pointer(&ts)), 0); e != 0 {
			return nil, osErr(e, "")
		}
	}
	return okMsg(id).float("delta_s", float64(epoch-before)/1e9), nil
}

func (a *agent) opSetTime(id int64, r req) (*msg, error) { return a.setTime(id, r) }

func hostnameOK(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '.' || s[0] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(hostnameChars, s[i]) < 0 {
			return false
		}
	}
	return true
}

func machineIDOK(s string) bool {
	if len(s) != 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

type identity struct {
	hostname, machineID string
	entropy             []byte
}

func checkIdentity(r req) (*identity, error) {
	h, err := r.str("hostname")
	if err != nil {
		return nil, err
	}
	if !hostnameOK(h) {
		return nil, einval("invalid hostname '%s'", h)
	}
	mid, err := r.str("machine_id")
	if err != nil {
		return nil, err
	}
	mid = strings.ToLower(mid)
	if !machineIDOK(mid) {
		return nil, einval("machine_id must be 32 hex digits")
	}
	ent, err := r.b64("entropy")
	if err != nil {
		return nil, err
	}
	return &identity{h, mid, ent}, nil
}

func (a *agent) opReidentify(id int64, r req) (*msg, error) {
	ident, err := checkIdentity(r)
	if err != nil {
		return nil, err
	}
	if err := a.reidentify(ident); err != nil {
		return nil, err
	}
	return okMsg(id), nil
}

func (a *agent) opSettle(id int64, r req) (*msg, error) {
	start := time.Now()
	warm, err := r.boolean("warm", true)
	if err != nil {
		return nil, err
	}
	m, err := a.settle(id, r, warm)
	if err != nil {
		return nil, err
	}
	return m.float("took_s", time.Since(start).Seconds()), nil
}

// settle: the identity it carries checked (none: the clock only), so that a refused settle
// changes nothing; then the clock (its epoch_ns was the host's time at sending; setTime checks
// it before it sets it), the warm-up poked if warm, then the identity
func (a *agent) settle(id int64, r req, warm bool) (*msg, error) {
	var ident *identity
	if _, ok := r["hostname"]; ok {
		var err error
		if ident, err = checkIdentity(r); err != nil {
			return nil, err
		}
	}
	m, err := a.setTime(id, r)
	if err != nil {
		return nil, err
	}
	a.pokeIf(warm)
	if ident != nil {
		if err := a.reidentify(ident); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// record: tests only, what would have changed the machine (in <test-root>/.calls)
func (a *agent) record(what string) {
	if !a.testing {
		return
	}
	f, err := os.OpenFile(a.root+"/.calls", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err == nil {
		f.WriteString(what + "\n")
		f.Close()
	}
}

func (a *agent) path(p string) string {
	if a.root == "" {
		return p
	}
	return strings.TrimRight(a.root, "/") + "/" + strings.TrimLeft(p, "/")
}

func (a *agent) reidentify(id *identity) error {
	a.record("hostname " + id.hostname)
	if !a.testing {
		if err := syscall.Sethostname([]byte(id.hostname)); err != nil {
			return osErr(err, "")
		}
	}
	if err := a.replaceFile("/etc/hostname", []byte(id.hostname+"\n"), 0o644); err != nil {
		return err
	}
	if err := a.replaceFile("/etc/machine-id", []byte(id.machineID+"\n"), 0o444); err != nil {
		return err
	}
	if err := a.replaceFile("/etc/hosts", a.hosts(id.hostname), 0o644); err != nil {
		return err
	}
	if len(id.entropy) > 0 {
		a.record("entropy " + base64.StdEncoding.EncodeToString(id.entropy))
		if !a.testing {
			mixEntropy(id.entropy)
		}
	}
	return nil
}

func mixEntropy(data []byte) {
	fd, err := syscall.Open("/dev/urandom", syscall.O_WRONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		logf("entropy: %v", err)
		return
	}
	defer syscall.Close(fd)
	syscall.Write(fd, data)
	buf := make([]byte, 8+len(data))
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(data) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(data))
	copy(buf[8:], data)
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), rndAddEntropy, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		logf("entropy ioctl failed: %v", e)
		return
	}
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), rndReseedCRNG, 0); e != 0 {
		logf("entropy ioctl failed: %v", e)
	}
}

func readText(path string) []byte {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil
	}
	defer syscall.Close(fd)
	var out []byte
	buf := make([]byte, 4096)
	for {
		n, err := syscall.Read(fd, buf)
		if err != nil {
			return nil
		}
		if n <= 0 {
			return out
		}
		out = append(out, buf[:n]...)
	}
}

// splitLines: Python's str.splitlines for the separators a hosts file may hold
func splitLines(s string) []string {
	var out []string
	for len(s) > 0 {
		i := strings.IndexAny(s, "\r\n")
		if i < 0 {
			out = append(out, s)
			break
		}
		out = append(out, s[:i])
		if s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n' {
			i++
		}
		s = s[i+1:]
	}
	return out
}

func (a *agent) hosts(hostname string) []byte {
	var lines []string
	for _, ln := range splitLines(string(readText(a.path("/etc/hosts")))) {
		if !strings.HasPrefix(ln, "127.0.1.1") {
			lines = append(lines, ln)
		}
	}
	has := false
	for _, ln := range lines {
		f := strings.Fields(ln)
		if len(f) >= 2 && f[0] == "127.0.0.1" && f[1] == "localhost" {
			has = true
			break
		}
	}
	if !has {
		lines = append([]string{"127.0.0.1\tlocalhost"}, lines...)
	}
	lines = append(lines[:1], append([]string{"127.0.1.1\t" + hostname}, lines[1:]...)...)
	return []byte(strings.Join(lines, "\n") + "\n")
}

func (a *agent) replaceFile(path string, data []byte, mode uint32) error {
	if a.rewrite(path, data, mode) {
		return nil
	}
	// the file a link names (the image links the identity files into /run/tenki, tmpfs)
	target := realpath(a.path(path))
	tmp := target + ".tenki-tmp"
	fd, err := syscall.Open(tmp, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_TRUNC|syscall.O_CLOEXEC, 0o666)
	if err != nil {
		return osErr(err, tmp)
	}
	_, werr := syscall.Write(fd, data)
	syscall.Close(fd)
	if werr != nil {
		return osErr(werr, tmp)
	}
	if err := syscall.Chmod(tmp, mode); err != nil {
		return osErr(err, tmp)
	}
	if err := syscall.Rename(tmp, target); err != nil {
		return osErr(err, tmp)
	}
	return nil
}

// rewrite: write data over the regular file path names (through its links) in place, if it is
// exactly as long; false, with nothing written, for any other file.
func (a *agent) rewrite(path string, data []byte, mode uint32) bool {
	fd, err := syscall.Open(a.path(path), syscall.O_WRONLY|syscall.O_CLOEXEC|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
	if err != nil {
		return false
	}
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if syscall.Fstat(fd, &st) != nil || st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Size != int64(len(data)) {
		return false
	}
	if st.Mode&0o7777 != mode {
		syscall.Fchmod(fd, mode)
	}
	pos := int64(0)
	for pos < int64(len(data)) {
		n, err := syscall.Pwrite(fd, data[pos:], pos)
		if err != nil {
			return true // as the Python agent: an error here is not retried by a replace
		}
		pos += int64(n)
	}
	return true
}

// realpath: os.path.realpath (non-strict: a missing tail is kept as it is)
func realpath(p string) string {
	if !strings.HasPrefix(p, "/") {
		wd, _ := os.Getwd()
		p = wd + "/" + p
	}
	out := "/"
	parts := strings.Split(p, "/")
	links := 0
	for i := 0; i < len(parts); i++ {
		c := parts[i]
		switch c {
		case "", ".":
			continue
		case "..":
			if j := strings.LastIndexByte(out, '/'); j > 0 {
				out = out[:j]
			} else {
				out = "/"
			}
			continue
		}
		next := out + "/" + c
		if out == "/" {
			next = "/" + c
		}
		dest, err := os.Readlink(next)
		if err != nil || links > 40 {
			out = next
			continue
		}
		links++
		rest := parts[i+1:]
		if strings.HasPrefix(dest, "/") {
			out = "/"
		}
		parts = append(strings.Split(dest, "/"), rest...)
		i = -1
	}
	return out
}

func (a *agent) opSync(id int64, r req) (*msg, error) {
	syscall.Sync()
	return okMsg(id), nil
}

// -- warm-up ----------------------------------------------------------------------------------

// warmup: runs a program (/bin/true) each time the agent pokes it, the way an exec starts one
// (see docs/snapshots.md): Go's fork and exec, the kernel's, the loader and libc's start-up
// (at the same addresses as a user's program: the guest has no address space randomization),
// its output read through Go's poller, the wait. A restored clone translates all of that again;
// the warm-up has it done on the other vCPU, from a restore's first ping on, while the settle
// runs, before the user's first exec. One run at a time: a poke while one runs starts none.
type warmup struct {
	program string
	devnull int
	mu      sync.Mutex
	running bool
}

func (w *warmup) poke() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		return
	}
	w.running = true
	go w.run()
}

func (w *warmup) run() {
	defer func() {
		w.mu.Lock()
		w.running = false
		w.mu.Unlock()
	}()
	var out [2]int
	if err := syscall.Pipe2(out[:], syscall.O_CLOEXEC); err != nil {
		logf("warm-up not run: %v", err)
		return
	}
	pid, err := syscall.ForkExec(w.program, []string{w.program}, &syscall.ProcAttr{
		Dir: "/", Env: []string{"PATH=" + defaultPath},
		Files: []uintptr{uintptr(w.devnull), uintptr(out[1]), uintptr(out[1])},
		Sys:   &syscall.SysProcAttr{Setsid: true}})
	syscall.Close(out[1])
	if err != nil {
		syscall.Close(out[0])
		logf("warm-up not run: %v", err)
		return
	}
	syscall.SetNonblock(out[0], true)
	f := os.NewFile(uintptr(out[0]), "warm-up")
	io.Copy(io.Discard, f)
	f.Close()
	var ws syscall.WaitStatus
	for {
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
			break
		}
	}
}

// -- main -------------------------------------------------------------------------------------

const usage = `usage: agentd [--listen PATH] [--port-name NAME] [--wait-file PATH] [--test-root DIR]

  --listen PATH     serve a unix socket at PATH instead of the virtio port
  --port-name NAME  the virtio-serial port to serve (default org.tenki.agent)
  --wait-file PATH  serve only once PATH exists (tenki-init creates it when the guest is set up)
  --test-root DIR   tests only: identity files below DIR; clock, hostname and entropy untouched
                    (recorded in DIR/.calls)
  --test-warmup PROGRAM  tests only: the warm-up runs PROGRAM (with --listen)
`

func main() {
	if len(os.Args) > 1 && os.Args[1] == execAsFlag {
		execAs(os.Args[2:])
	}
	opts := map[string]string{"--listen": "", "--port-name": portName, "--wait-file": "",
		"--test-root": "", "--test-warmup": ""}
	args := os.Args[1:]
	for len(args) > 0 {
		if _, ok := opts[args[0]]; ok && len(args) >= 2 {
			opts[args[0]] = args[1]
			args = args[2:]
			continue
		}
		os.Stderr.WriteString(usage)
		if args[0] == "-h" || args[0] == "--help" {
			os.Exit(0)
		}
		os.Exit(2)
	}
	syscall.Umask(0o022)
	os.Chdir("/")
	if wf := opts["--wait-file"]; wf != "" {
		deadline := time.Now().Add(waitFileLimit)
		for {
			var st syscall.Stat_t
			if syscall.Stat(wf, &st) == nil {
				break
			}
			if time.Now().After(deadline) {
				logf("%s did not appear within 60s; serving anyway", wf)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	a := &agent{procs: map[int64]*proc{}, root: opts["--test-root"]}
	a.testing = a.root != ""
	a.bootID = strings.TrimSpace(string(readText("/proc/sys/kernel/random/boot_id")))
	null, err := syscall.Open("/dev/null", syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		logf("/dev/null: %v", err)
		os.Exit(1)
	}
	a.devnull = null
	if opts["--listen"] != "" {
		a.port = newListenPort(opts["--listen"])
		if opts["--test-warmup"] != "" {
			a.warm = &warmup{program: opts["--test-warmup"], devnull: null}
		}
	} else {
		a.port = newVirtioPort(opts["--port-name"])
		a.warm = &warmup{program: "/bin/true", devnull: null}
	}
	a.out = newOutbox(a.port)
	logf("version %s (%s) pid %d", version, implementation, os.Getpid())
	a.serve()
}
