(function(){
  var root=document.documentElement;
  function parentHtml(){try{return window.parent!==window?window.parent.document.documentElement:null}catch(e){return null}}
  function mode(){
    var q=new URLSearchParams(location.search).get('theme');if(q==='dark'||q==='light')return q;
    var p=parentHtml();if(p){if(p.classList.contains('dark'))return 'dark';if(p.classList.contains('light'))return 'light';}
    var s=null;try{s=localStorage.getItem('theme')}catch(e){}if(s==='dark'||s==='light')return s;
    return matchMedia('(prefers-color-scheme: dark)').matches?'dark':'light';
  }
  function apply(){root.dataset.theme=mode();}
  apply();
  var p=parentHtml();
  if(p)new MutationObserver(apply).observe(p,{attributes:true,attributeFilter:['class','style']});
  addEventListener('storage',apply);
  matchMedia('(prefers-color-scheme: dark)').addEventListener('change',apply);
  root.dataset.embedded=p?'true':'false';
})();
document.addEventListener('DOMContentLoaded',function(){
  var embedded=document.documentElement.dataset.embedded==='true';
  document.querySelectorAll('[data-standalone-only]').forEach(function(el){el.hidden=embedded;});
  var copy=document.getElementById('copy-callback');
  if(copy)copy.addEventListener('click',function(){
    var text=document.getElementById('callback-url').innerText;
    function done(){copy.textContent='Copied';setTimeout(function(){copy.textContent='Copy'},2000);}
    function fallback(){var r=document.createRange();r.selectNodeContents(document.getElementById('callback-url'));
      var s=getSelection();s.removeAllRanges();s.addRange(r);try{document.execCommand('copy');done();}catch(e){}}
    if(navigator.clipboard&&navigator.clipboard.writeText)navigator.clipboard.writeText(text).then(done,fallback);else fallback();
  });
  // Inside Airflow's iframe the sign-in must be the top-level page (Entra ID refuses to be framed, and
  // the sandbox forbids the frame to navigate its parent): the same POST is sent from the parent's document.
  document.addEventListener('submit',function(ev){
    var form=ev.target;
    if(!embedded||!form.matches("form[action^='/o365mail/authorize/']"))return;
    try{var top=window.top.document,f=top.createElement('form');
      f.method='post';f.action=new URL(form.getAttribute('action'),location.href).href;f.style.display='none';
      top.body.appendChild(f);ev.preventDefault();f.submit();}catch(e){}
  });
  document.addEventListener('click',function(ev){
      var button=ev.target.closest('button.check');if(!button)return;
      var row=button.closest('tbody'),list=row.querySelector('.checks');
      button.disabled=true;button.textContent='Checking…';row.querySelector('.checks-row').hidden=false;list.innerHTML='<li class="muted">running the checks…</li>';
      fetch(button.dataset.url,{method:'POST',credentials:'same-origin',headers:{ {{- check_header|tojson -}} :'1','Accept':'application/json'}})
        .then(function(r){return r.json().then(function(b){if(!r.ok)throw new Error(b.detail||('HTTP '+r.status));return b;});})
        .then(function(body){
          list.innerHTML='';
          body.checks.forEach(function(c){
            var li=document.createElement('li');li.dataset.status=c.status;li.dataset.link=c.link;
            var cls={ok:'text-ok',warn:'text-warn',fail:'text-error',skip:'text-info'}[c.status]||'text-info';
            var st=document.createElement('b');st.className='status '+cls;st.textContent=c.status.toUpperCase();
            var link=document.createElement('b');link.textContent=c.link+': ';
            li.append(st,link,document.createTextNode(c.detail));
            if(c.fix){var fx=document.createElement('div');fx.className='fix';fx.textContent='Fix: '+c.fix;li.append(fx);}
            list.append(li);
          });
          row.querySelector('tr.conn').innerHTML=body.row_html;  // the state, tokens and error, read again
          row.dataset.checked=body.checks.some(function(c){return c.status==='fail'})?'fail':'ok';
        })
        .catch(function(err){list.innerHTML='';var li=document.createElement('li');li.className='text-error';
          li.textContent='Check failed: '+err.message;list.append(li);row.dataset.checked='error';})
        .finally(function(){var b=row.querySelector('button.check');b.disabled=false;b.textContent='Check';});
  });
});
