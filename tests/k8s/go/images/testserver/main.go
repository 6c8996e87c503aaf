// testserver is what the Kubernetes tests run in their pods. Every answer says who answered
// (the pod's name and the address the request arrived on) and who called (the peer address the
// server saw), so a test can tell whether a packet was NATed on its way.
//
//	GET /            {"pod", "local", "peer"}
//	GET /healthz     liveness probe: 200, counted with the prober's address
//	GET /readyz      readiness probe: 200, counted likewise
//	GET /probes      {"healthz": {"<addr>": n}, "readyz": {...}}
//	GET /call?url=U  the server itself GETs U and returns its body: traffic from inside the pod
//	GET /call?tcp=H:P or ?udp=H:P   one line or datagram to an echo server, returns its answer
//	TCP and UDP echo on ECHO_PORT (default 9000): each line or datagram is answered with the
//	peer address seen
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

var (
	mu     sync.Mutex
	probes = map[string]map[string]int{"healthz": {}, "readyz": {}}
)

func podName() string {
	if name := os.Getenv("POD_NAME"); name != "" {
		return name
	}
	name, _ := os.Hostname()
	return name
}

func host(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func localAddr(r *http.Request) string {
	if addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		return host(addr.String())
	}
	return ""
}

func probe(kind string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		probes[kind][host(r.RemoteAddr)]++
		mu.Unlock()
		_, _ = io.WriteString(w, "ok\n")
	}
}

func call(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var (
		body []byte
		err  error
	)
	switch {
	case q.Get("url") != "":
		body, err = httpGet(q.Get("url"))
	case q.Get("tcp") != "":
		body, err = echo("tcp", q.Get("tcp"))
	case q.Get("udp") != "":
		body, err = echo("udp", q.Get("udp"))
	default:
		http.Error(w, "want url=, tcp= or udp=", http.StatusBadRequest)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	_, _ = w.Write(body)
}

func httpGet(url string) ([]byte, error) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s answered %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

func echo(network, addr string) ([]byte, error) {
	conn, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "?\n"); err != nil {
		return nil, err
	}
	if network == "udp" {
		buf := make([]byte, 2048)
		n, err := conn.Read(buf)
		return buf[:n], err
	}
	return bufio.NewReader(conn).ReadBytes('\n')
}

func serveEcho(port string) {
	udp, err := net.ListenPacket("udp", ":"+port)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			_, peer, err := udp.ReadFrom(buf)
			if err != nil {
				continue
			}
			_, _ = udp.WriteTo([]byte(host(peer.String())+"\n"), peer)
		}
	}()
	tcp, err := net.Listen("tcp", ":"+port)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			conn, err := tcp.Accept()
			if err != nil {
				continue
			}
			go func(c net.Conn) {
				defer c.Close()
				lines := bufio.NewScanner(c)
				for lines.Scan() {
					if _, err := io.WriteString(c, host(c.RemoteAddr().String())+"\n"); err != nil {
						return
					}
				}
			}(conn)
		}
	}()
}

func main() {
	httpPort := os.Getenv("HTTP_PORT")
	if httpPort == "" {
		httpPort = "8080"
	}
	echoPort := os.Getenv("ECHO_PORT")
	if echoPort == "" {
		echoPort = "9000"
	}
	serveEcho(echoPort)
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]string{"pod": podName(), "local": localAddr(r), "peer": host(r.RemoteAddr)})
	})
	mux.HandleFunc("/healthz", probe("healthz"))
	mux.HandleFunc("/readyz", probe("readyz"))
	mux.HandleFunc("/probes", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		writeJSON(w, probes)
	})
	mux.HandleFunc("/call", call)
	log.Printf("testserver %s: http :%s, echo :%s", podName(), httpPort, echoPort)
	log.Fatal(http.ListenAndServe(":"+httpPort, mux))
}
