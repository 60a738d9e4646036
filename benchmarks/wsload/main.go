// Command wsload is the WebSocket load client of oxypy's benchmarks.
//
// It opens -c connections to -url, and on each one sends a -size byte binary
// message, waits for its echo and records the round trip, for -d. It prints
// one line: "msgs=<n> rate=<msgs/s> p50_ms=<ms> p99_ms=<ms> errors=<n>".
// With -probe it makes one handshake and one echo within -timeout and prints
// "ok" or "error: <reason>" (exit status 1).
//
// Build without network in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode:$(mktemp -d) go build -o /tmp/wsload main.go
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

func dial(url string, timeout time.Duration) (*websocket.Conn, error) {
	d := websocket.Dialer{HandshakeTimeout: timeout, ReadBufferSize: 4096, WriteBufferSize: 4096}
	conn, _, err := d.Dial(url, nil)
	return conn, err
}

func echo(conn *websocket.Conn, msg []byte, deadline time.Time) error {
	conn.SetWriteDeadline(deadline)
	if err := conn.WriteMessage(websocket.BinaryMessage, msg); err != nil {
		return err
	}
	conn.SetReadDeadline(deadline)
	mt, got, err := conn.ReadMessage()
	if err != nil {
		return err
	}
	if mt != websocket.BinaryMessage || !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs (type %d, %d bytes)", mt, len(got))
	}
	return nil
}

func probe(url string, size int, timeout time.Duration) int {
	conn, err := dial(url, timeout)
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return 1
	}
	defer conn.Close()
	if err := echo(conn, bytes.Repeat([]byte{'p'}, size), time.Now().Add(timeout)); err != nil {
		fmt.Printf("error: no echo came back: %v\n", err)
		return 1
	}
	fmt.Println("ok")
	return 0
}

func main() {
	url := flag.String("url", "ws://127.0.0.1:8080/ws", "WebSocket URL")
	conns := flag.Int("c", 50, "connections")
	duration := flag.Duration("d", 3*time.Second, "duration of the measurement")
	size := flag.Int("size", 1024, "message size in bytes")
	timeout := flag.Duration("timeout", 5*time.Second, "handshake and per-message timeout")
	doProbe := flag.Bool("probe", false, "one handshake and one echo, then exit")
	flag.Parse()
	if *doProbe {
		os.Exit(probe(*url, *size, *timeout))
	}

	clients := make([]*websocket.Conn, 0, *conns)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := 0; i < *conns; i++ {
		c, err := dial(*url, *timeout)
		if err != nil {
			fmt.Printf("error: dial %d: %v\n", i, err)
			os.Exit(1)
		}
		clients = append(clients, c)
	}

	var mu sync.Mutex
	var all []time.Duration
	errors := 0
	start := time.Now()
	end := start.Add(*duration)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func(i int, c *websocket.Conn) {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte('a' + i%26)}, *size)
			local := make([]time.Duration, 0, 1<<16)
			errs := 0
			for time.Now().Before(end) {
				t0 := time.Now()
				if err := echo(c, msg, t0.Add(*timeout)); err != nil {
					errs++
					break
				}
				local = append(local, time.Since(t0))
			}
			mu.Lock()
			all = append(all, local...)
			errors += errs
			mu.Unlock()
		}(i, c)
	}
	wg.Wait()
	elapsed := time.Since(start)
	if len(all) == 0 {
		fmt.Printf("error: no echo came back (errors=%d)\n", errors)
		os.Exit(1)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(p float64) float64 {
		idx := int(p * float64(len(all)-1))
		return float64(all[idx]) / 1e6
	}
	fmt.Printf("msgs=%d rate=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d\n",
		len(all), float64(len(all))/elapsed.Seconds(), pct(0.50), pct(0.99), errors)
}
