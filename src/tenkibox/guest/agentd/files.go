package main

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"syscall"
)

func (a *agent) opReadFile(id int64, r req) (*msg, error) {
	path, err := r.str("path")
	if err != nil {
		return nil, err
	}
	offset, err := r.int("offset", ptr(0))
	if err != nil {
		return nil, err
	}
	length, err := r.int("length", ptr(maxChunk))
	if err != nil {
		return nil, err
	}
	length = minInt64(length, maxChunk)
	if offset < 0 || length < 0 {
		return nil, einval("offset and length must be >= 0")
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, osErr(err, path)
	}
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return nil, osErr(err, "")
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return nil, &opError{path + " is a directory", "EISDIR"}
	}
	buf := make([]byte, length)
	n, err := syscall.Pread(fd, buf, offset)
	if err == syscall.EAGAIN {
		n, err = 0, nil
	}
	if err != nil {
		return nil, osErr(err, "")
	}
	regular := st.Mode&syscall.S_IFMT == syscall.S_IFREG
	end := offset + int64(n)
	eof := int64(n) < length || (regular && end >= st.Size)
	size := end
	if regular && st.Size != 0 {
		size = st.Size
	}
	m := okMsg(id)
	m.key("data")
	m.b = append(m.b, '"')
	m.b = appendBase64(m.b, buf[:n])
	m.b = append(m.b, '"')
	return m.int("size", size).bool("eof", eof), nil
}

// replaceable: whether a write to path can go through a temporary file and a rename
func replaceable(path string) (bool, error) {
	target := realpath(path)
	for _, p := range []string{"/proc/", "/sys/", "/dev/"} {
		if strings.HasPrefix(target, p) {
			return false, nil
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(target, &st); err != nil {
		if err == syscall.ENOENT {
			return true, nil
		}
		return false, osErr(err, target)
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return false, &opError{path + " is a directory", "EISDIR"}
	}
	return st.Mode&syscall.S_IFMT == syscall.S_IFREG, nil
}

func (a *agent) opWriteFile(id int64, r req) (*msg, error) {
	path, err := r.str("path")
	if err != nil {
		return nil, err
	}
	data, err := r.b64("data")
	if err != nil {
		return nil, err
	}
	offset, err := r.int("offset", ptr(0))
	if err != nil {
		return nil, err
	}
	mode64, err := r.int("mode", ptr(0o644))
	if err != nil {
		return nil, err
	}
	mode := uint32(mode64) & 0o7777
	if offset < 0 {
		return nil, einval("offset must be >= 0")
	}
	if i := strings.LastIndexByte(path, '/'); i > 0 {
		if err := os.MkdirAll(path[:i], 0o777); err != nil {
			return nil, osErr(err, "")
		}
	}
	flags := syscall.O_WRONLY | syscall.O_CREAT | syscall.O_CLOEXEC
	truncate := truthy(r["truncate"])
	tmp, target := "", ""
	if truthy(r["tmp"]) {
		ok, err := replaceable(path)
		if err != nil {
			return nil, err
		}
		if ok {
			target = realpath(path)
			i := strings.LastIndexByte(target, '/')
			head, base := target[:i], target[i+1:]
			if len(base) > 200 {
				base = base[:200]
			}
			var rnd [6]byte
			rand.Read(rnd[:])
			path = head + "/." + base + ".tenki-" + hex.EncodeToString(rnd[:]) + ".part"
			tmp = path
			flags |= syscall.O_EXCL
			truncate, offset = true, 0
		}
	}
	if truncate {
		flags |= syscall.O_TRUNC
	}
	fd, err := syscall.Open(path, flags, mode)
	if err != nil {
		return nil, osErr(err, path)
	}
	size, err := func() (int64, error) {
		defer syscall.Close(fd)
		var st syscall.Stat_t
		if err := syscall.Fstat(fd, &st); err != nil {
			return 0, err
		}
		seekable := st.Mode&syscall.S_IFMT == syscall.S_IFREG
		if truncate && seekable {
			if err := syscall.Fchmod(fd, mode); err != nil {
				return 0, err
			}
		}
		pos := offset
		for len(data) > 0 {
			var n int
			var err error
			if seekable {
				n, err = syscall.Pwrite(fd, data, pos)
			} else {
				n, err = syscall.Write(fd, data)
			}
			if err != nil {
				return 0, err
			}
			data, pos = data[n:], pos+int64(n)
		}
		if err := syscall.Fstat(fd, &st); err != nil {
			return 0, err
		}
		return st.Size, nil
	}()
	if err != nil {
		if tmp != "" {
			syscall.Unlink(tmp)
		}
		return nil, osErr(err, "")
	}
	m := okMsg(id).int("size", size)
	if tmp != "" {
		m.str("tmp", tmp).str("target", target)
	}
	return m, nil
}

func (a *agent) opRename(id int64, r req) (*msg, error) {
	src, err := r.str("src")
	if err != nil {
		return nil, err
	}
	dst, err := r.str("dst")
	if err != nil {
		return nil, err
	}
	if err := syscall.Rename(src, dst); err != nil {
		return nil, osErr(err, src)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil {
		return nil, osErr(err, dst)
	}
	return okMsg(id).int("size", st.Size), nil
}

func (a *agent) opRemove(id int64, r req) (*msg, error) {
	path, err := r.str("path")
	if err != nil {
		return nil, err
	}
	if err := syscall.Unlink(path); err != nil {
		if err == syscall.ENOENT {
			return okMsg(id).bool("existed", false), nil
		}
		return nil, osErr(err, path)
	}
	return okMsg(id).bool("existed", true), nil
}
