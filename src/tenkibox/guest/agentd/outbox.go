package main

import "sync"

const writeBatch = 256 << 10

type outItem struct {
	b []byte
	p *proc // process output: counted in p.pending while queued
	n int64
}

// outbox: everything for the host goes through here, in order (the Python agent's Outbox). A message
// finding nobody writing, nothing queued and a host is written at once by the goroutine that
// made it; otherwise it queues and the writer goroutine sends it. While no host is connected
// the port's write blocks (virtio: in the driver, until a host opens the port; listen: until a
// connection is accepted), so only the writer goroutine waits there and the rest queue here:
// queued process output counts against its process (proc.pending), whose pumps stop reading at
// outputLimit (4 MiB) until the next host takes it.
type outbox struct {
	port  port
	mu    sync.Mutex
	cv    *sync.Cond
	items []outItem
	busy  bool // a goroutine is writing to the port
}

func newOutbox(pt port) *outbox {
	o := &outbox{port: pt}
	o.cv = sync.NewCond(&o.mu)
	go o.run()
	return o
}

// put sends or queues b; true when it was queued (then its n bytes count against p until
// written).
func (o *outbox) put(b []byte, p *proc, n int64) bool {
	o.mu.Lock()
	if len(o.items) > 0 || o.busy || !o.port.connected() {
		o.items = append(o.items, outItem{b, p, n})
		o.cv.Broadcast()
		o.mu.Unlock()
		return true
	}
	o.busy = true
	o.mu.Unlock()
	o.port.write(b)
	o.mu.Lock()
	o.busy = false
	o.cv.Broadcast()
	o.mu.Unlock()
	return false
}

func (o *outbox) run() {
	var buf []byte
	for {
		o.mu.Lock()
		for len(o.items) == 0 || o.busy {
			o.cv.Wait()
		}
		o.busy = true
		k, size := 0, 0
		for k < len(o.items) && (k == 0 || size+len(o.items[k].b) <= writeBatch) {
			size += len(o.items[k].b)
			k++
		}
		batch := make([]outItem, k)
		copy(batch, o.items[:k])
		for i := 0; i < k; i++ {
			o.items[i] = outItem{}
		}
		o.items = o.items[k:]
		if len(o.items) == 0 {
			o.items = nil // let the backing array go
		}
		o.mu.Unlock()
		var data []byte
		if k == 1 {
			data = batch[0].b
		} else {
			buf = buf[:0]
			for _, it := range batch {
				buf = append(buf, it.b...)
			}
			data = buf
		}
		o.port.write(data)
		if cap(buf) > 4*writeBatch {
			buf = nil
		}
		o.mu.Lock()
		o.busy = false
		o.cv.Broadcast()
		o.mu.Unlock()
		// After letting go of the port: a pump may hold its process's lock while it writes.
		for _, it := range batch {
			if it.p != nil && it.n > 0 {
				it.p.release(it.n)
			}
		}
	}
}
