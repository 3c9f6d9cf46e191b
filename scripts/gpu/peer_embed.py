# The embedding peer of scripts/gpu/bench.sh: sends the first N lines of a text file to a running
# llama-server's /v1/embeddings in batches of B texts, K requests in flight, and prints texts/s.
#   python3 peer_embed.py PORT FILE N B K
import http.client, json, sys, time, threading
port, path, n, b, k = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
texts = [l.rstrip("\n") for l in open(path)][:n]
batches = [texts[i:i + b] for i in range(0, len(texts), b)]
lock = threading.Lock(); nxt = [0]; got = [0]; dims = [0]
def worker():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while True:
        with lock:
            i = nxt[0]; nxt[0] += 1
        if i >= len(batches): return
        c.request("POST", "/v1/embeddings", json.dumps({"input": batches[i]}), {"Content-Type": "application/json"})
        r = json.loads(c.getresponse().read())
        with lock:
            got[0] += len(r["data"]); dims[0] = len(r["data"][0]["embedding"])
t0 = time.time()
ts = [threading.Thread(target=worker) for _ in range(k)]
[t.start() for t in ts]; [t.join() for t in ts]
s = time.time() - t0
print(f"peer llama-server: {got[0]} texts dim {dims[0]} in {s:.1f} s, {got[0]/s:,.0f} texts/s")
