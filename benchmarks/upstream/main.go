// Command upstream is the origin server of oxypy's benchmarks.
//
// It listens on 127.0.0.1 (port from -listen, 0 = pick one) and prints
// "READY <port>" on stdout once accepting. Endpoints:
//
//	GET  /small  1 KiB body with Content-Length
//	GET  /big    100 MiB body with Content-Length (size from -big)
//	GET  /stream chunked text/plain: 10 lines, 100 ms apart, each flushed
//	POST /upload reads the whole body (Content-Length or chunked), answers the byte count
//	GET  /ws     WebSocket echo (gorilla/websocket)
//
// Build without network in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode:$(mktemp -d) go build -o /tmp/upstream main.go
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	CheckOrigin:     func(*http.Request) bool { return true },
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to listen on")
	bigSize := flag.Int64("big", 100<<20, "size of /big in bytes")
	flag.Parse()

	small := bytes.Repeat([]byte("x"), 1024)
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB

	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", "1024")
		w.Write(small)
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(*bigSize, 10))
		if r.Method == http.MethodHead {
			return
		}
		left := *bigSize
		for left > 0 {
			n := int64(len(chunk))
			if left < n {
				n = left
			}
			if _, err := w.Write(chunk[:n]); err != nil {
				return
			}
			left -= n
		}
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		flusher, _ := w.(http.Flusher)
		for i := 0; i < 10; i++ {
			if i > 0 {
				time.Sleep(100 * time.Millisecond)
			}
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			n = -1
		}
		body := strconv.FormatInt(n, 10)
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		conn, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer conn.Close()
		for {
			mt, msg, err := conn.ReadMessage()
			if err != nil {
				return
			}
			if err := conn.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	})

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stdout, "READY %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	srv := &http.Server{Handler: mux}
	log.Fatal(srv.Serve(ln))
}
