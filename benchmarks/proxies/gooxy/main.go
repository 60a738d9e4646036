// Go oxy 1.3 as a benchmark anchor: the same chains as oxypy's, built at run
// time (GOPATH mode, golang-github-vulcand-oxy-dev), never committed as a binary.
//
//	gooxy -chain rr UPSTREAM            roundrobin(forward), one upstream
//	gooxy -chain full UP1 UP2           trace(connlimit(ratelimit(cbreaker(buffer(roundrobin(forward))))))
//
// Limits are huge (nothing is rejected) and the trace goes to a discard
// writer, as in benchmarks/proxies/oxypy_chain.py.  Listens on 127.0.0.1:0
// and prints "READY <port>".
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	log "github.com/sirupsen/logrus"
	"github.com/vulcand/oxy/buffer"
	"github.com/vulcand/oxy/cbreaker"
	"github.com/vulcand/oxy/connlimit"
	"github.com/vulcand/oxy/forward"
	"github.com/vulcand/oxy/ratelimit"
	"github.com/vulcand/oxy/roundrobin"
	"github.com/vulcand/oxy/trace"
	"github.com/vulcand/oxy/utils"
)

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	chain := flag.String("chain", "rr", "rr or full")
	flag.Parse()
	log.SetLevel(log.ErrorLevel)
	if flag.NArg() < 1 {
		must(fmt.Errorf("usage: gooxy -chain rr|full UPSTREAM [UPSTREAM2]"))
	}
	// Keep-alive to the upstream for every concurrent request, as oxypy's
	// pool does (Go's default keeps only 2 idle connections per host, so at
	// 64 connections most requests would dial a new one).
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = 0
	transport.MaxIdleConnsPerHost = 1024
	fwd, err := forward.New(forward.PassHostHeader(true), forward.RoundTripper(transport))
	must(err)
	lb, err := roundrobin.New(fwd)
	must(err)
	for _, raw := range flag.Args() {
		u, err := url.Parse(raw)
		must(err)
		must(lb.UpsertServer(u))
	}
	var handler http.Handler = lb
	if *chain == "full" {
		buf, err := buffer.New(lb, buffer.Retry("IsNetworkError() && Attempts() < 2"))
		must(err)
		cb, err := cbreaker.New(buf, "NetworkErrorRatio() > 0.5")
		must(err)
		extract, err := utils.NewExtractor("client.ip")
		must(err)
		rates := ratelimit.NewRateSet()
		must(rates.Add(time.Second, 1000000000, 1000000000))
		rl, err := ratelimit.New(cb, extract, rates)
		must(err)
		cl, err := connlimit.New(rl, extract, 1000000)
		must(err)
		tr, err := trace.New(cl, io.Discard)
		must(err)
		handler = tr
	} else if *chain != "rr" {
		must(fmt.Errorf("unknown chain %q", *chain))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	fmt.Printf("READY %d\n", ln.Addr().(*net.TCPAddr).Port)
	must(http.Serve(ln, handler))
}
