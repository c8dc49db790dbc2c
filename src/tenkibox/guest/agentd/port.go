package main

import (
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const hostWaitMs = 1000

type port interface {
	read(buf []byte) int // 0: no host (EOF)
	waitHost()
	write(b []byte) // blocks while no host is connected: the data is for the next host
	// connected: whether a host seems to be there; false makes the outbox queue a message
	// for its writer goroutine instead of having its maker wait in write() for the next host
	connected() bool
}

// virtioPort: with no host connected, read() returns 0 at once and poll() reports POLLHUP, so
// level-triggered waiting would spin; an edge-triggered epoll fires on each wake-up of the
// port's wait queue (host opens or closes). Writes block in the driver while no host is
// connected, which holds output for the next host.
type virtioPort struct {
	name string
	fd   atomic.Int32
	host atomic.Bool // the last read returned data (a host is there)
	ep   int
	mu   sync.Mutex
}

func newVirtioPort(name string) *virtioPort {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		logf("epoll_create: %v", err)
		os.Exit(1)
	}
	p := &virtioPort{name: name, ep: ep}
	p.fd.Store(-1)
	p.open()
	return p
}

func (p *virtioPort) find() string {
	base := "/sys/class/virtio-ports"
	d, err := os.Open(base)
	if err != nil {
		return ""
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	sort.Strings(names)
	for _, e := range names {
		b, err := os.ReadFile(base + "/" + e + "/name")
		if err == nil && strings.TrimSpace(string(b)) == p.name {
			return "/dev/" + e
		}
	}
	return ""
}

func (p *virtioPort) open() {
	delay := 20 * time.Millisecond
	warned := false
	var fd int
	var dev string
	for {
		dev = p.find()
		if dev != "" {
			var err error
			fd, err = syscall.Open(dev, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
			if err == nil {
				break
			}
			if !warned {
				logf("cannot open %s: %v; retrying", dev, err)
				warned = true
			}
		} else if !warned {
			logf("waiting for virtio port %s", p.name)
			warned = true
		}
		time.Sleep(delay)
		if delay *= 2; delay > 500*time.Millisecond {
			delay = 500 * time.Millisecond
		}
	}
	p.mu.Lock()
	old := int(p.fd.Swap(int32(fd)))
	if old >= 0 {
		syscall.EpollCtl(p.ep, syscall.EPOLL_CTL_DEL, old, nil)
		syscall.Close(old)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT | (1 << 31), Fd: int32(fd)}
	syscall.EpollCtl(p.ep, syscall.EPOLL_CTL_ADD, fd, &ev)
	p.mu.Unlock()
	logf("serving on %s", dev)
}

func (p *virtioPort) read(buf []byte) int {
	for {
		n, err := syscall.Read(int(p.fd.Load()), buf)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			p.host.Store(false)
			logf("port read failed: %v; reopening", err)
			time.Sleep(200 * time.Millisecond)
			p.open()
			return 0
		}
		p.host.Store(n > 0)
		return n
	}
}

func (p *virtioPort) connected() bool { return p.host.Load() }

func (p *virtioPort) waitHost() {
	var evs [4]syscall.EpollEvent
	syscall.EpollWait(p.ep, evs[:], hostWaitMs)
}

func (p *virtioPort) write(b []byte) {
	for len(b) > 0 {
		n, err := syscall.Write(int(p.fd.Load()), b)
		if err != nil {
			if err == syscall.EINTR || err == syscall.EAGAIN {
				continue
			}
			logf("port write failed: %v", err)
			time.Sleep(200 * time.Millisecond)
			continue
		}
		b = b[n:]
	}
}

// listenPort: a unix socket standing in for the port (tests, development); each accepted
// connection is one host. Connections are accepted by a goroutine of their own, so that a
// write waiting for the next host (as a virtio write waits in the driver) never holds up the
// accepting.
type listenPort struct {
	path string
	lfd  int
	mu   sync.Mutex
	cv   *sync.Cond
	conn int
}

func newListenPort(path string) *listenPort {
	os.Remove(path)
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err == nil {
		err = syscall.Bind(fd, &syscall.SockaddrUnix{Name: path})
	}
	if err == nil {
		err = syscall.Listen(fd, 1)
	}
	if err != nil {
		logf("listen %s: %v", path, err)
		os.Exit(1)
	}
	p := &listenPort{path: path, lfd: fd, conn: -1}
	p.cv = sync.NewCond(&p.mu)
	go p.accept()
	return p
}

func (p *listenPort) accept() {
	for {
		p.mu.Lock()
		for p.conn >= 0 {
			p.cv.Wait()
		}
		p.mu.Unlock()
		nfd, _, err := syscall.Accept4(p.lfd, syscall.SOCK_CLOEXEC)
		if err != nil {
			if err != syscall.EINTR {
				time.Sleep(50 * time.Millisecond)
			}
			continue
		}
		p.mu.Lock()
		p.conn = nfd
		p.cv.Broadcast()
		p.mu.Unlock()
	}
}

func (p *listenPort) drop(c int) {
	p.mu.Lock()
	if p.conn == c {
		p.conn = -1
		syscall.Shutdown(c, syscall.SHUT_RDWR)
		syscall.Close(c)
		p.cv.Broadcast()
	}
	p.mu.Unlock()
}

func (p *listenPort) read(buf []byte) int {
	p.mu.Lock()
	c := p.conn
	p.mu.Unlock()
	if c < 0 {
		return 0
	}
	for {
		n, err := syscall.Read(c, buf)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || n <= 0 {
			p.drop(c)
			return 0
		}
		return n
	}
}

func (p *listenPort) connected() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn >= 0
}

func (p *listenPort) waitHost() {
	p.mu.Lock()
	for p.conn < 0 {
		p.cv.Wait()
	}
	p.mu.Unlock()
}

func (p *listenPort) write(b []byte) {
	for {
		p.mu.Lock()
		for p.conn < 0 {
			p.cv.Wait()
		}
		c := p.conn
		p.mu.Unlock()
		rest := b
		var err error
		for len(rest) > 0 {
			var n int
			n, err = syscall.SendmsgN(c, rest, nil, nil, syscall.MSG_NOSIGNAL)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				break
			}
			rest = rest[n:]
		}
		if err == nil {
			return
		}
		p.drop(c)
	}
}
