package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	pathpkg "path"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	deviceWait     = 10 * time.Second // default wait_s: a hot-plugged disk appears in sysfs later
	sandboxUID     = 1000             // the image's user "tenki": owns the root of a new volume
	extMagicOffset = 1024 + 56
	probeBytes     = 128 << 10
)

// libcErr: the Python agent's _libc_call failure, OSError(code, "name: strerror")
func libcErr(name string, err error) *opError {
	en, ok := err.(syscall.Errno)
	if !ok {
		return &opError{name + ": " + err.Error(), ""}
	}
	text := en.Error()
	if text != "" {
		text = strings.ToUpper(text[:1]) + text[1:]
	}
	return &opError{fmt.Sprintf("[Errno %d] %s: %s", int(en), name, text), errnoNames[en]}
}

// pyFloat: Python's float() of a JSON value (as the Python agent's float(req.get("wait_s", ...)))
func pyFloat(v any) (float64, error) {
	switch x := v.(type) {
	case int64:
		return float64(x), nil
	case float64:
		return x, nil
	case bool:
		if x {
			return 1, nil
		}
		return 0, nil
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(x), 64)
		if err != nil {
			return 0, &opError{fmt.Sprintf("ValueError: could not convert string to float: '%s'", x), ""}
		}
		return f, nil
	}
	kind := "NoneType"
	switch v.(type) {
	case []any:
		kind = "list"
	case map[string]any:
		kind = "dict"
	}
	return 0, &opError{"TypeError: float() argument must be a string or a real number, not '" + kind + "'", ""}
}

// normpath: os.path.normpath for the absolute paths mount and umount accept
func normpath(p string) string {
	if p == "" {
		return "."
	}
	return pathpkg.Clean(p)
}

func (a *agent) findDisk(serial string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		base := a.path("/sys/block")
		var names []string
		if d, err := os.Open(base); err == nil {
			all, _ := d.Readdirnames(-1)
			d.Close()
			for _, n := range all {
				if strings.HasPrefix(n, "vd") {
					names = append(names, n)
				}
			}
		}
		sort.Strings(names)
		for _, n := range names {
			if strings.TrimSpace(string(readText(base+"/"+n+"/serial"))) == serial {
				dev := "/dev/" + n
				var st syscall.Stat_t
				if syscall.Stat(dev, &st) == nil {
					return dev, nil
				}
			}
		}
		if !time.Now().Before(deadline) {
			return "", &opError{"no virtio disk with serial " + pyRepr(serial), "ENODEV"}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pyRepr: Python's repr() of a str, for the printable strings a serial is
func pyRepr(s string) string {
	s = strings.ReplaceAll(s, "\\", "\\\\")
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		return "\"" + s + "\""
	}
	return "'" + strings.ReplaceAll(s, "'", "\\'") + "'"
}

// unescapeMountField: the octal escapes (\040 ...) of /proc/self/mounts
func unescapeMountField(f string) string {
	if strings.IndexByte(f, '\\') < 0 {
		return f
	}
	var b strings.Builder
	for i := 0; i < len(f); i++ {
		if f[i] == '\\' && i+4 <= len(f) {
			o := f[i+1 : i+4]
			if o[0] >= '0' && o[0] <= '7' && o[1] >= '0' && o[1] <= '7' && o[2] >= '0' && o[2] <= '7' {
				n, _ := strconv.ParseUint(o, 8, 16)
				b.WriteRune(rune(n))
				i += 3
				continue
			}
		}
		b.WriteByte(f[i])
	}
	return b.String()
}

func mounts() [][2]string {
	var out [][2]string
	for _, ln := range splitLines(string(readText("/proc/self/mounts"))) {
		f := strings.Fields(ln)
		if len(f) >= 2 {
			out = append(out, [2]string{unescapeMountField(f[0]), unescapeMountField(f[1])})
		}
	}
	return out
}

// probe: (filesystem type or "", blank) of a block device
func probe(dev string) (string, bool, error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", false, osErr(err, dev)
	}
	head := make([]byte, probeBytes)
	n := 0
	for n < len(head) {
		m, err := f.Read(head[n:])
		if m <= 0 || err != nil {
			break
		}
		n += m
	}
	f.Close()
	head = head[:n]
	if len(head) >= extMagicOffset+2 && head[extMagicOffset] == 0x53 && head[extMagicOffset+1] == 0xef {
		return "ext4", false, nil // the ext4 driver mounts ext2/3/4
	}
	fstype := ""
	if prog, err := exec.LookPath("blkid"); err == nil {
		cmd := exec.Command(prog, "-p", "-s", "TYPE", "-o", "value", dev)
		var out bytes.Buffer
		cmd.Stdout = &out
		if cmd.Start() == nil {
			done := make(chan struct{})
			timer := time.AfterFunc(30*time.Second, func() {
				cmd.Process.Kill()
				close(done)
			})
			cmd.Wait()
			if timer.Stop() {
				fstype = strings.TrimSpace(out.String())
			} else {
				<-done // timed out: no type
			}
		}
	}
	if fstype != "" {
		return fstype, false, nil
	}
	return "", len(bytes.Trim(head, "\x00")) == 0, nil
}

func (a *agent) opMount(id int64, r req) (*msg, error) {
	serial, err := r.str("serial")
	if err != nil {
		return nil, err
	}
	p, err := r.str("path")
	if err != nil {
		return nil, err
	}
	p = normpath(p)
	if !strings.HasPrefix(p, "/") || p == "/" {
		return nil, einval("path must be absolute and not /")
	}
	readOnly := truthy(r["read_only"])
	wait := deviceWait
	if v, ok := r["wait_s"]; ok {
		f, err := pyFloat(v)
		if err != nil {
			return nil, err
		}
		wait = time.Duration(f * 1e9)
	}
	dev, err := a.findDisk(serial, wait)
	if err != nil {
		return nil, err
	}
	for _, m := range mounts() {
		if m[1] == p {
			if realpath(m[0]) == realpath(dev) {
				return okMsg(id).str("device", dev), nil
			}
			return nil, &opError{p + " is already a mount point of " + m[0], "EBUSY"}
		}
	}
	fstype, blank, err := probe(dev)
	if err != nil {
		return nil, err
	}
	if fstype == "" {
		if !blank {
			return nil, einval("%s holds data but no filesystem tenki recognizes; refusing to format it", dev)
		}
		if !truthy(r["mkfs"]) || readOnly {
			return nil, einval("%s has no filesystem", dev)
		}
		prog, err := exec.LookPath("mkfs.ext4")
		if err != nil {
			return nil, osErr(syscall.ENOENT, "mkfs.ext4")
		}
		cmd := exec.Command(prog, "-q", "-F", "-m", "0", "-E",
			fmt.Sprintf("nodiscard,root_owner=%d:%d", sandboxUID, sandboxUID), dev)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			if _, exited := err.(*exec.ExitError); !exited {
				return nil, osErr(err, prog)
			}
			return nil, &opError{"mkfs.ext4 " + dev + " failed: " + strings.TrimSpace(stderr.String()), "EIO"}
		}
		fstype = "ext4"
	}
	if err := os.MkdirAll(p, 0o777); err != nil {
		return nil, osErr(err, "")
	}
	var flags uintptr
	if readOnly {
		flags = syscall.MS_RDONLY
	}
	if err := syscall.Mount(dev, p, fstype, flags, ""); err != nil {
		return nil, libcErr("mount", err)
	}
	return okMsg(id).str("device", dev), nil
}

func (a *agent) opUmount(id int64, r req) (*msg, error) {
	p, err := r.str("path")
	if err != nil {
		return nil, err
	}
	p = normpath(p)
	mounted := false
	for _, m := range mounts() {
		if m[1] == p {
			mounted = true
			break
		}
	}
	if !mounted {
		return okMsg(id).bool("was_mounted", false), nil
	}
	// umount writes back the filesystem's dirty data before it returns.
	if err := syscall.Unmount(p, 0); err != nil {
		return nil, libcErr("umount2", err)
	}
	return okMsg(id).bool("was_mounted", true), nil
}
